"""Training data: where rows come from (sources), what shape they have (formats), and how they become
token ids with loss masks on disk (prepare)."""

IGNORE = -100  # the label of a token that carries no loss (transformers' ignore_index)
