"""Merge model folders from a mergekit YAML configuration, out of core (issue 18).

    python -m experiments.merge_models --config=merge.yml --out=DIR [--overwrite] [--seed=0]
        [--max_shard_size=5GB] [--chunk_mb=64] [--noprogress]

The configuration is mergekit's (merge_method, models or slices, base_model, parameters, dtype,
out_dtype, tokenizer_source); see jaxpeft/merge/kit_config.py for what is read and what is refused.
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "mergekit YAML configuration file.")
flags.DEFINE_string("out", None, "Output folder (an HF model folder, written atomically).")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_integer("seed", 0, "Seed of the random methods (dare_*, della*).")
flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard (e.g. 5GB, 500MB).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_integer("chunk_mb", 64, "Row chunks of at most this many MB of fp32 per input (the embedding too).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.merge.kit_exec import MergeOptions, merge_config_file

    try:
        summary = merge_config_file(FLAGS.config, FLAGS.out, MergeOptions(
            max_shard_size=FLAGS.max_shard_size, seed=FLAGS.seed, overwrite=FLAGS.overwrite,
            progress=FLAGS.progress, chunk_bytes=FLAGS.chunk_mb << 20))
    except (ConfigError, FileExistsError) as e:
        raise app.UsageError(str(e)) from None
    print(f"merged {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB in {summary['seconds']:.1f} s "
          f"into {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
