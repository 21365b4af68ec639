"""The prepare stage: where rows come from (sources), what shape they have (formats), the chat template
that renders them (chat_templates), and how they become token ids with loss masks on disk (prepare),
in a child process ahead of the trainer's imports when it can (prepare_ahead)."""

IGNORE = -100  # the label of a token that carries no loss (transformers' ignore_index)
