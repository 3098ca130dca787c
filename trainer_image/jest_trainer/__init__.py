"""jest_trainer: JEST selection and contrastive training that runs inside the worker pods."""
