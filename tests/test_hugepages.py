"""With BIPFT_HUGEPAGES=1 the `bipft` command re-executes itself once with glibc's huge-page tunable."""
import os
import platform
import subprocess
import sys

import pytest

from bipft_jax import cli, hugepages
from bipft_jax.errors import UserError

GLIBC = ("glibc", "2.36")


ON = {"BIPFT_HUGEPAGES": "1"}


@pytest.mark.parametrize("environ, libc, mode, expected", [
    (ON, GLIBC, "madvise", True),
    (ON, GLIBC, "always", True),
    ({}, GLIBC, "madvise", False),  # not asked for: glibc's default
    ({"BIPFT_HUGEPAGES": "0"}, GLIBC, "madvise", False),
    ({"BIPFT_HUGEPAGES": ""}, GLIBC, "madvise", False),  # empty: as unset
    (ON, GLIBC, "never", False),  # no huge pages to ask for
    (ON, GLIBC, "", False),  # a kernel without THP
    (ON, ("glibc", "2.34"), "madvise", False),  # before the tunable existed
    (ON, ("glibc", "2.x"), "madvise", False),
    (ON, ("", ""), "madvise", False),  # musl, macOS...
    ({**ON, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", False),  # the user's own setting
    ({**ON, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", True),
])
def test_when_to_reexecute(environ, libc, mode, expected):
  assert hugepages.wanted(environ, libc, mode) is expected


@pytest.mark.parametrize("value", ["yes", "true", "on", "off", " 1", "2"])
def test_a_value_other_than_0_or_1_is_an_error_not_a_silent_off(value):
  with pytest.raises(UserError, match=f"BIPFT_HUGEPAGES={value!r}: use 1"):
    hugepages.wanted({"BIPFT_HUGEPAGES": value}, ("", ""), "")  # even where it could do nothing


def test_the_command_reports_a_bad_value_in_one_line(monkeypatch, capsys):
  monkeypatch.setenv("BIPFT_HUGEPAGES", "yes")
  monkeypatch.setattr(sys, "argv", ["bipft", "--version"])
  assert cli.main() == 2
  err = capsys.readouterr().err
  assert err == "bipft: error: BIPFT_HUGEPAGES='yes': use 1 (huge-page malloc) or 0 (glibc's default)\n"


def test_the_tunable_is_added_to_the_users_own():
  env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
  assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


def _child_tunables(extra_env: dict) -> str:
  """GLIBC_TUNABLES as a Python child sees it after calling reexec_with_hugepages."""
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BIPFT_HUGEPAGES")}
  code = ("from bipft_jax import hugepages; hugepages.reexec_with_hugepages(); import os; "
          "print(repr(os.environ.get('GLIBC_TUNABLES')))")
  done = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                        check=True)
  return done.stdout.strip()


def test_a_process_restarts_with_the_tunable_once():
  if sys.platform != "linux" or not hugepages.wanted(ON, platform.libc_ver(), hugepages.thp_mode()):
    pytest.skip("this host has no glibc >= 2.35 with transparent huge pages: nothing to set")
  assert _child_tunables(ON) == repr("glibc.malloc.hugetlb=1")
  assert _child_tunables({**ON, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == repr(
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert _child_tunables({}) == repr(None)  # the default: glibc's own


def test_only_the_command_reexecutes_not_a_callers_main(monkeypatch):
  calls = []
  monkeypatch.setattr(hugepages, "reexec_with_hugepages", lambda: calls.append(1))
  with pytest.raises(SystemExit):
    cli.main(["--version"])
  assert calls == []
  monkeypatch.setattr(sys, "argv", ["bipft"])
  with pytest.raises(SystemExit):
    cli.main()  # prints the help
  assert calls == [1]
