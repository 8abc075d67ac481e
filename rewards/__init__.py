"""veritrain rewards package."""
