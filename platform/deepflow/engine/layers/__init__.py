"""Building blocks of the decoder: plain torch modules, one concept per file."""
