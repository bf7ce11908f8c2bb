"""Built-in datasets: PG19 (books), PG19Masked (masked LM on PG19), Clevr (visual Q&A),
PythonSourceCorpus (the running Python's own sources, for demos) and the Beep stub."""
