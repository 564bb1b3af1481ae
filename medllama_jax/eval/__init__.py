"""MIBE evaluation: reading model outputs as predictions and scoring them against the gold data."""
