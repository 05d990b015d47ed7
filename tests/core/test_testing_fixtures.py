"""enigma.testing reaches other test suites through its pytest11 entry point."""

from __future__ import annotations


def test_fixtures_are_offered_to_a_plugin_authors_suite(pytester, installed_plugins):
    pytester.makepyfile(
        """
        import os
        import enigma_exact

        def test_my_plugin(make_plugin_host, enigma_home):
            assert os.environ["ENIGMA_HOME"] == str(enigma_home)
            host = make_plugin_host(enigma_exact)
            assert host.records["enigma_exact"].status == "loaded"
            assert host.select("backend", "exact").plugin == "enigma_exact"
            assert host.select("backend").name == "torch-cpu"

        def test_my_backend_runs_an_engine(make_plugin_host, run_engine):
            run = run_engine(make_plugin_host(enigma_exact), backend="exact")
            assert type(run.engine.runner.backend).__name__ == "ExactBackend"

        def test_installed(plugin_host):
            assert plugin_host.records["exact"].distribution == "enigma-plugin-exact"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
