"""The conformance kit catches broken backends: each mutant of StrictBackend fails its kit test, saying why.

Every mutant in ``conformance_mutants.EXPECTED`` is StrictBackend with one defect. The kit runs on each (only
the test that must catch it, to stay fast) in a real pytest session, and that test must fail with a message
that names the defect and the rule. The healthy StrictBackend passes the whole kit in test_strict_backend.py.
"""

from __future__ import annotations

import textwrap

import pytest
from conformance_mutants import EXPECTED

SUITES = textwrap.dedent(
    """
    import pytest
    import conformance_mutants
    from art_core.testing import BackendConformance, StrictStorage


    def suite_for(backend_class, **flags):
        class Suite(BackendConformance):
            learning_rate = 0.5
            call_timeout_s = 60.0

            @pytest.fixture
            def storage(self):
                return StrictStorage()

            @pytest.fixture
            def backend(self, storage):
                return backend_class(storage)

            @pytest.fixture
            def base_model(self):
                return "strict-letters"

            @pytest.fixture
            def fresh_backend(self, storage):
                return lambda: backend_class(storage)

        for name, value in flags.items():
            setattr(Suite, name, value)
        return Suite


    for mutant in conformance_mutants.EXPECTED:
        globals()["Test" + mutant.__name__] = suite_for(mutant)


    class TestClaimsResumeWithoutAFactory(BackendConformance):
        @pytest.fixture
        def backend(self):
            return conformance_mutants.StrictBackend()

        @pytest.fixture
        def base_model(self):
            return "strict-letters"
    """
)


class Outcomes:
    """A pytest plugin that records each test's outcome and failure text."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[str, str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.found[report.nodeid.split("::", 1)[1]] = (report.outcome, str(report.longrepr or ""))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """node id -> (outcome, failure text) of each mutant's catching test, all run in one pytest session."""
    directory = tmp_path_factory.mktemp("mutants")
    (directory / "test_mutant_suites.py").write_text(SUITES)
    (directory / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    selected = [f"Test{m.__name__}::{test}" for m, (test, _) in EXPECTED.items()]
    selected.append("TestClaimsResumeWithoutAFactory::test_step_survives_a_fresh_backend_instance")
    recorder = Outcomes()
    arguments = [
        "-q",
        "-p",
        "no:cacheprovider",
        "--import-mode=importlib",
        "-c",
        str(directory / "pytest.ini"),
    ]
    pytest.main(
        [
            *arguments,
            "--rootdir",
            str(directory),
            *(f"{directory}/test_mutant_suites.py::{s}" for s in selected),
        ],
        plugins=[recorder],
    )
    return recorder.found


@pytest.mark.parametrize("mutant", list(EXPECTED), ids=[m.__name__ for m in EXPECTED])
def test_the_kit_fails_the_mutant_naming_the_defect_and_the_rule(
    mutant: type, outcomes: dict[str, tuple[str, str]]
) -> None:
    test, fragments = EXPECTED[mutant]
    outcome, text = outcomes[f"Test{mutant.__name__}::{test}"]
    assert outcome == "failed", f"{mutant.__name__} ({mutant.__doc__}) passed {test}"
    missing = [fragment for fragment in fragments if fragment not in text]
    assert not missing, f"{test} failed {mutant.__name__} but its message lacks {missing}:\n{text[-2000:]}"


def test_a_claimed_capability_without_its_fixture_fails_instead_of_skipping(
    outcomes: dict[str, tuple[str, str]],
) -> None:
    outcome, text = outcomes["TestClaimsResumeWithoutAFactory::test_step_survives_a_fresh_backend_instance"]
    assert outcome == "failed", outcome
    assert "claims supports_resume = True but does not override the `fresh_backend`" in text
    assert "a claimed capability is checked, never skipped" in text
