"""Training: the association step and its anchor memory, TF1-exact optimisers, the train
state and the jitted step, and the trainer that builds and runs them from a config."""
