"""Grading specs, one module per lab (see `autograder.spec`). Never imported inside a sandbox."""
