"""``enigma quantize --type exl2`` and ``enigma pull`` of an EXL2 branch, through the real command."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from enigma.testing import make_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("exl2-cli") / "llama")


@pytest.mark.slow
def test_quantize_list_run_and_pull_a_branch(enigma, llama: Path, tmp_path: Path) -> None:
    from hub_server import FakeHub

    calibration = tmp_path / "cal.txt"
    calibration.write_text(resources.files("enigma_exl2").joinpath("calibration.txt").read_text())
    made = enigma("quantize", str(llama), "--type", "exl2", "--bpw", "3.5", "--head-bits", "8",
                  "--calibration", str(calibration), "--output", str(tmp_path / "out"))
    assert made.returncode == 0, made.stderr
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quantization["head_bits"] == 8 and abs(quantization["achieved_bpw"] - 3.5) <= 0.05
    assert quantization["calibration"]["dataset"] == "cal.txt"
    ran = enigma("run", str(tmp_path / "out"), "Hello", "--max-tokens", "8", "--temperature", "0", "--local")
    assert ran.returncode == 0, ran.stderr

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("EXL2 quants of a tiny Llama; one branch per bpw\n")
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-exl2", repo)
        hub.add_repo("acme/tiny-exl2", tmp_path / "out", revision="3.5bpw")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        pulled = enigma("pull", "hf:acme/tiny-exl2@3.5bpw", env=env)
        assert pulled.returncode == 0, pulled.stderr
    listed = json.loads(enigma("list", "--json").stdout)
    assert [(m["name"], m["quantization"]) for m in listed] == [("tiny-exl2:3.5bpw", "EXL2")]
    ran = enigma("run", "tiny-exl2:3.5bpw", "Hello", "--max-tokens", "8", "--temperature", "0", "--local")
    assert ran.returncode == 0, ran.stderr


def test_options_that_do_not_fit_are_refused(enigma, llama: Path, tmp_path: Path) -> None:
    out_of_range = enigma("quantize", str(llama), "--type", "exl2", "--bpw", "1.0", "--output", str(tmp_path / "a"))
    assert out_of_range.returncode == 1 and "out of range" in out_of_range.stderr
    other = enigma("quantize", str(llama), "--type", "Q4_K_M", "--bpw", "4", "--output", str(tmp_path / "b"))
    assert other.returncode == 1 and "EXL2's" in other.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
