"""The format readers: one module per checkpoint family, each turning its files into a Subject.

``tiecheck.loaders`` picks the reader by what a target's bytes are (``detect``) and calls it; each
reader leans on the loaders' helpers (the guards for untrusted bytes, file offsets, declarations)
and returns the same ``Subject``, so nothing downstream knows where the tensors came from.
"""
