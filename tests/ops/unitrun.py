"""Runs one ops test module's unittest cases and reports them the way check.sh reads: a
"N passed, M failed[, K skipped]" line on stdout, and the same counts as JSON in the file named
by OPS_SUMMARY_FILE when it is set. Exit status 1 when anything failed."""

import json
import os
import sys
import unittest


def run(module_name):
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[module_name])
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    summary_file = os.environ.get("OPS_SUMMARY_FILE")
    if summary_file:
        with open(summary_file, "w") as f:
            json.dump({"passed": passed, "failed": failed, "skipped": skipped}, f)
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    return 1 if failed else 0
