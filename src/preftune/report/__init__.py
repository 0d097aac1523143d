"""What a run shows and leaves behind for people: the live progress line (`progress`), the metrics file and its
optional sinks (`tracking`), figures (`plots`) and the model card (`card`)."""
