//! `sgpt quantize`: a model directory with its linear layers stored in E4M3, for `--dtype fp8`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, ValueEnum};

use sgpt::backend::cpu::fp8::Fp8Blocks;

use super::{human, progress_bar};

#[derive(Args)]
pub struct QuantizeArgs {
    /// The model directory to read (float weights).
    #[arg(long, short)]
    model: PathBuf,
    /// The directory to write; it must not exist. It gets the model's files but its weights,
    /// and one model.safetensors.
    #[arg(long, short)]
    output: PathBuf,
    /// fp8: the four linear layers of every block in E4M3 with a scale per output channel;
    /// fp8-alternate: those of every other block (1, 3, 5, …), the rest as stored.
    #[arg(long, value_enum, default_value = "fp8")]
    dtype: Fp8Dtype,
    /// No progress bar on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Fp8Dtype {
    Fp8,
    Fp8Alternate,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let blocks = match a.dtype {
        Fp8Dtype::Fp8 => Fp8Blocks::All,
        Fp8Dtype::Fp8Alternate => Fp8Blocks::Alternate,
    };
    sgpt::io::output::remove_temps_on_signal()?; // Ctrl-C leaves no partial directory
    let t0 = Instant::now();
    let bar = progress_bar(
        64,
        a.quiet,
        "quantizing {bar:40} {pos}/{len} tensors  {elapsed}",
    );
    let w = sgpt::quantize::quantize_dir(&a.model, &a.output, blocks, &|done, all| {
        bar.set_length(all as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let w = w?;
    println!(
        "wrote {}: the linear layers of {} block(s) in E4M3, weights {} (from {}) in {:.1} s; \
         run it with --dtype {d} or without --dtype",
        w.dir.display(),
        w.fp8_blocks,
        human(w.bytes as f64, "B"),
        human(w.source_bytes as f64, "B"),
        t0.elapsed().as_secs_f64(),
        d = blocks.dtype_name()
    );
    if !w.skipped.is_empty() {
        println!(
            "not copied (other weight formats, hidden files): {}",
            w.skipped.join(", ")
        );
    }
    Ok(())
}
