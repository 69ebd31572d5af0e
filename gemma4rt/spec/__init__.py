"""spec: speculative decoding with the Gemma 4 assistant (MTP) drafters."""
