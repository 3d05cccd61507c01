"""Reading an mmad --trace CSV (plain or gzipped), shared by
trace_summary.py, trace_phases.py and trace_drift.py."""
import csv
import gzip
from collections import defaultdict


def read_jobs(path):
    """The trace's rows (one per chunk, each a dict of its columns) grouped by
    copy: {job number: [rows in file order]}."""
    jobs = defaultdict(list)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for r in csv.DictReader(f):
            jobs[int(r["job"])].append(r)
    return jobs
