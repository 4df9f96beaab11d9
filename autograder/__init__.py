"""Hardened, parallel autograder for the QLab labs: `python -m autograder --help`.

Student code runs only in sandboxes (`sandbox`), which send back plain data: the answers of the
student's functions to the probes of the lab's grading spec (`spec`, `specs/<lab>.py`). This process,
which never runs student code, judges those answers (`judge`) and writes the gradebook, grades_<lab>.csv,
grades_all.csv and feedback (`records`). `grade` ties it together; `collect` finds submissions; `notebook` rebuilds
each submission from the source notebook by grade_id.
"""
