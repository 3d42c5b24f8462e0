import sys


def pytest_terminal_summary(terminalreporter):
    """The durations test_deploy.py measured (image, boot, deploys), for the CI log."""
    module = sys.modules.get("test_deploy")
    times = getattr(module, "TIMES", None)
    if times:
        terminalreporter.section("deploy times")
        for label, seconds in times.items():
            shown = "%7.1f s" % seconds if isinstance(seconds, float) else seconds
            terminalreporter.write_line("%-50s %s" % (label, shown))
