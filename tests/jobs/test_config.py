"""The job as it runs on a device (hedgehog.jobs.config.for_device): the CPU job is the defaults, unchanged; on
CUDA the weights are bf16 and both stages take 8x the batch and 8x the tokens, so the same optimizer steps."""
import dataclasses

import pytest
import torch

from hedgehog.errors import UserError
from hedgehog.jobs.checks import check_convert_job
from hedgehog.jobs.config import CUDA_BATCH_SCALE, ConvertJob, for_device
from hedgehog.train.stage1 import Stage1Config
from hedgehog.train.stage2 import Stage2Config


def steps(job):
    s1, s2 = job.stage1, job.stage2
    return s1.tokens // (s1.batch_size * job.seq_len), s2.tokens // (s2.batch_size * job.seq_len)


def test_the_cpu_job_is_the_defaults():
    job = ConvertJob()
    cpu = for_device(job, torch.device("cpu"))
    assert cpu.dtype == "fp32" and cpu.batch_scale == 1
    assert cpu.stage1 == Stage1Config() and cpu.stage2 == Stage2Config()


def test_cuda_takes_bf16_and_larger_batches_for_the_same_steps():
    job = ConvertJob()
    gpu = for_device(job, torch.device("cuda", 0))
    assert gpu.dtype == "bf16" and gpu.batch_scale == CUDA_BATCH_SCALE == 8
    assert (gpu.stage1.batch_size, gpu.stage2.batch_size) == (16, 8)
    assert (gpu.stage1.tokens, gpu.stage2.tokens) == (8 * 65536, 8 * 24576)
    assert steps(gpu) == steps(for_device(job, torch.device("cpu")))
    # what the user sets stays: a dtype, a scale (1: the CPU's batches on a GPU), no stage 2
    mine = for_device(dataclasses.replace(job, dtype="fp32", batch_scale=1, stage2=None), torch.device("cuda"))
    assert mine.dtype == "fp32" and mine.stage1 == Stage1Config() and mine.stage2 is None


@pytest.mark.parametrize("field, value, says", [("batch_scale", 0, "--batch-scale"), ("dtype", "fp8", "--dtype")])
def test_bad_scale_or_dtype_is_refused(field, value, says):
    with pytest.raises(UserError, match=says):
        check_convert_job(dataclasses.replace(ConvertJob(), **{field: value}))
