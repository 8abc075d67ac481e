"""veritrain proofs package."""
