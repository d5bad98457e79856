"""The language-model library every stage and the server share: loading, chat encoding and label
masks, generation, metrics and scoring, judges, reward-model scoring, preference pairs, bottleneck
adapters, self-checks and model cards. What trains lives in tasks/training/."""
