"""Data: read files of many formats into one record, tokenise, batch, check."""
