"""Training: a command becomes a prepared run (launch, prepare), which the loop trains (trainer)."""
