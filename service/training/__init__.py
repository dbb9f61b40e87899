"""Training pipeline (torch): datasets, models, mixup / interpolated AT, export, pool, calibration."""
