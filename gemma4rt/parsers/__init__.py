"""parsers: the gemma4 reasoning parser and tool-call parser (streaming and whole). Pure text in,
events out; no I/O, no torch."""
