"""``medsyn serve``: generation as a REST service with jobs, a QA gate before release and a real database."""
