"""A run's artifacts and what lives beyond one run: the stages' file contracts, the champion
registry in S3, the retraining run's plan, and DVC experiments."""
