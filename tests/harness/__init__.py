"""Helpers the tests share, imported as a library (conftest.py files hold only fixtures and hooks,
which pytest finds itself):

    paths.py        REPO, the repository root (the cwd and PYTHONPATH of every subprocess)
    jobs.py         job folders: FAST_JOB (the whole chain on the demo model), FAST_TRAIN,
                    PREPARE_JOB, make_job, write_png, folder_snapshot, png_header_only (a pixel
                    bomb), fake_finished_job (a finished job written by hand, for the audit)
    resume.py       a job killed at a named point (kill_at, engine_cli) and what must equal a clean run
    lab.py          a temporary installation and its daemons as real subprocesses (Lab, Daemon)
    faults.py       real faults (mounts, full disks, libfaketime) and check_evidence
    strategies.py   Hypothesis strategies and checks of the fuzz tests; toml_writer.py their TOML
    stamp_kind.py   a kind defined only here, loaded as a plug-in ([kinds] plugins)
"""
