"""veritrain trainer package."""
