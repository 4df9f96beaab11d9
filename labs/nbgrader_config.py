"""nbgrader configuration for the QLab labs.

The course directory is the folder holding this file, wherever it lives (the tests copy it elsewhere):

    source/<lab>/<lab>.ipynb     instructor notebooks: solutions, hidden tests        (in git)
    release/<lab>/               student notebooks, made by `python -m labs.release`  (generated)
    submitted/<student>/<lab>/   notebooks to grade                                    (generated)
    autograded/, feedback/       nbgrader's output                                     (generated)
    gradebook.db                 nbgrader's SQLite gradebook                           (generated)

There is no nbgrader exchange: students get the release from the book and submissions reach the
autograder directly, so the `release_assignment`/`collect` exchange commands are not used.
"""

import os

c = get_config()  # noqa: F821  (nbgrader injects get_config when it loads this file)

root = os.path.dirname(os.path.abspath(__file__))

c.CourseDirectory.root = root
c.CourseDirectory.course_id = "qlab"
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(root, "gradebook.db")

# What replaces a solution in the student's copy.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Grading runs each notebook top to bottom; no single cell of a lab should need more than this.
c.Execute.timeout = 120
