"""The model side shared by every stage: where each architecture keeps its FFN (`registry`), reading it (`capture`),
loading checkpoints (`models`), transformers-version differences (`compat`), router pooling and greedy decoding."""
