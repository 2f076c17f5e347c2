"""Shared test setup: the repository on sys.path, one torch thread, deterministic seeds, and the markers.

Markers (registered in pyproject.toml): ``gpu`` for everything under ``tests/gpu/`` and ``slow`` for the tests
named in ``SLOW`` below (measured with ``pytest --durations=0``, warm extension cache, on the 2-core machine).
``make test`` runs all of them; ``make test-fast`` deselects both.
"""

import os
import sys
import warnings
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread: the suite is many tiny ops, for which a second thread mostly adds synchronisation.
torch.set_num_threads(1)

# Tests that take more than a few seconds each: trainings, attacks, subprocesses, compiling kernels.
# A module name marks every test of the module; "module::test" marks one test (every parametrisation).
# Measured 2026-12-01 (AMD EPYC, 2 cores shared, warm cache); every entry took 2 s or more.
SLOW = {
    "test_train_ddp",  # torchrun subprocesses: ~60 s
    "test_loss_triton",  # test_loss.py again in a subprocess under TRITON_INTERPRET
    "test_cpp_backend::test_build_check_cpu",  # python -m cem_fast.build in a subprocess
    "test_cpp_backend::test_build_check_cuda",  # nvcc: ~130 s when not cached
    "test_triton_backend::test_kernels_compile_for_sm90",  # ahead-of-time Triton compiles + ptxas: ~50 s
    "test_bench_scripts::test_inference_overhead_quick",
    "test_bench_scripts::test_train_step_quick",
    "test_bench_scripts::test_bench_kernels_quick",
    "test_distributed::test_two_gloo_processes_match_one_process",
    # the two users of the module fixture smoke_table1 (~10 s of smoke trainings)
    "test_table::test_table1_smoke_has_the_full_layout",
    "test_table::test_efficiency_of_a_real_run_and_table9_layout",
    # the two users of the module fixture smoke_runs (three smoke trainings, attacks and bounds: ~25 s)
    "test_bound::test_bound_json_of_smoke_runs",
    "test_bound::test_figure3_from_records_alone",
    "test_attacks::test_cli_decoder_then_gan_on_a_smoke_run",
    "test_attacks::test_gan_attack_learns_and_resumes",
    "test_train::test_resume_after_kill_gives_identical_weights",
    "test_train::test_smoke_run_every_defence_with_and_without_cem",
    "test_train::test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over",
    "test_train::test_resume_of_a_run_from_before_dtype_existed",
    "test_train::test_lambda_zero_builds_no_cem",
    "test_train::test_official_schedule_and_config_record",
    "test_ops::test_training_step_under_torch_compile",  # torch.compile: ~2 s per case
    "test_packaging::test_cem_fast_imports_without_the_extras",  # a fresh interpreter imports every module
    "test_readme::test_reproduce_and_audit_lines_at_the_smoke_preset",  # trainings, attacks, an audit: ~15 s
    "test_readme::test_python_blocks_run",  # an audit of a tiny encoder
    "test_training_loop::test_strength_warning_comes_before_accuracy_reaches_chance",  # 2 epochs, 2,000 images
    "test_training_loop::test_lambda_16_collapses_at_the_raw_strength_and_not_with_reference_size",  # 2 x 4 epochs
    "test_training_loop::test_two_call_loop_matches_the_explicit_refit_loop",
    "test_training_loop::test_fullgraph_compile_from_the_first_call",  # torch.compile
    "test_training_loop::test_fullgraph_compile_is_the_first_call_in_a_fresh_process",  # a subprocess compiling
    "test_training_loop::test_compiled_step_does_not_recompile_and_still_counts_the_epoch",  # torch.compile
    "test_training_loop::test_lightning_callback_refits_at_epoch_end",
    "test_bench_scripts::test_gpu_check_dry_run",  # the GPU check's plumbing on the CPU: ~90-220 s
    "test_bench_scripts::test_gpu_check_imports_need_no_torch_pruning",
    "test_audit_cli::test_cli_audits_an_outside_encoder_on_the_cifar10_sample",  # smoke audits: ~6 s each
    "test_audit_cli::test_cli_error_has_no_traceback_in_a_fresh_process",
    "test_audit_ladder",  # every attack of the ladder trained on a smoke encoder
    "test_launch_count",  # the fused kernels under the Triton interpreter
    "test_readme::test_bench_lines_parse",  # a fresh interpreter per benchmark script
    "test_cli::test_the_docs_commands_at_the_smoke_preset",
    # the users of the module fixture smoke (the smoke grid trained and attacked, then recorded: ~7 s)
    "test_records::test_record_is_small_has_no_machine_path_and_only_record_files",
    "test_records::test_record_keeps_learning_curves_and_class_histograms",
    "test_records::test_encoder_weights_give_the_runs_features",
    "test_records::test_record_reads_as_finished_but_is_never_attacked_resumed_or_loaded",
    "test_records::test_save_refuses_to_overwrite_or_to_exceed_the_budget",
    "test_records::test_records_give_the_same_table_and_figures_as_the_runs",
    "test_records::test_results_check_passes_then_fails_on_an_edited_number",
    "test_records::test_check_flags_a_broken_record",
    "test_grid::test_a_grid_saves_each_runs_record_as_it_goes",  # the smoke grid trained and attacked (~8 s)
    "test_grid::test_a_job_whose_committed_record_is_complete_is_not_redone",
    "test_records::test_record_states_lambda_in_the_papers_units",
    "test_records::test_preset_table_reads_each_records_final_accuracy_and_machine",
    "test_records::test_committed_results_match_their_records_on_a_fresh_clone",  # a fresh interpreter: ~10 s
    # the speed options' smoke trainings (~3-11 s each); torch.compile: ~150 s on the loaded machine (cold cache)
    "test_speed::test_each_option_trains_with_a_finite_loss_and_is_recorded",
    "test_speed::test_channels_last_gives_the_default_loss_at_float32",
    "test_speed::test_resume_with_the_options_gives_the_uninterrupted_run",
    "test_speed::test_a_run_from_before_the_options_existed_resumes",
    "test_speed::test_batched_augmentation_has_the_per_image_distribution",
    "test_speed::test_compile_trains_with_a_finite_loss",
}


def node_seed(nodeid: str) -> int:
    """A seed that depends only on the test's node id: the same in every run and every process."""
    return zlib.crc32(nodeid.encode())


def _slow_key(item):
    """The entry of SLOW that marks ``item``, or None."""
    module = item.path.stem
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    for key in (module, f"{module}::{name}"):
        if key in SLOW:
            return key
    return None


def pytest_collection_modifyitems(config, items):
    gpu_dir = os.path.join(ROOT, "tests", "gpu") + os.sep
    used, modules = set(), set()
    for item in items:
        modules.add(item.path.stem)
        if str(item.path).startswith(gpu_dir):
            item.add_marker(pytest.mark.gpu)
        key = _slow_key(item)
        if key is not None:
            item.add_marker(pytest.mark.slow)
            used.add(key)
    # A renamed or moved test would silently leave the fast subset: say so.
    stale = sorted(k for k in SLOW - used if k.split("::")[0] in modules)
    if stale:
        warnings.warn(pytest.PytestWarning(f"tests/conftest.py SLOW names tests that do not exist: {stale}"))


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id (``node_seed``): inputs differ between tests, repeat between
    runs, and a failing test's report names its seed."""
    seed = node_seed(request.node.nodeid)
    request.node.rng_seed = seed
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "rng_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("rng seed", f"rng fixture seed: {seed} (zlib.crc32 of {item.nodeid!r})"))
