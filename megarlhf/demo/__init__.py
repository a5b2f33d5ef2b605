"""InstructGPT in miniature: the corpus, the pipeline that runs the three stages through the tools,
and the report (`tools/demo.py` is the command)."""
