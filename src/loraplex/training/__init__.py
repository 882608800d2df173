"""Training: `runner` trains one adapter per dataset against the pristine base (`loraplex.train`), `trainer`
sets up the HF Trainer for one adapter (batches and the answer-only loss come from `loraplex.lm`)."""
