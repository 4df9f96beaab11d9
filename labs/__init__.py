"""QLab labs: nbgrader sources in labs/source, student releases made by `python -m labs.release`."""
