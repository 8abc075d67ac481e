"""veritrain audit package."""
