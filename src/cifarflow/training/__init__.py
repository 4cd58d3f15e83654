"""Training: the trainer (`trainer`), its phases (`phases`) and hyperparameter search (`tuning`)."""
