//! Memory of one huge input line (issue 11): the peak RSS of `sgpt embed` on a 120 MB line must
//! stay near that of a short text, not grow with the line. Measured with getrusage over this
//! test binary's children, so this file holds this one test only (no other child can raise the
//! maximum).

mod common;

use std::process::{Command, Stdio};

fn peak_rss_of_children_kb() -> i64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut u), 0);
        u.ru_maxrss
    }
}

#[test]
fn a_120_mb_line_embeds_in_about_the_memory_of_a_short_one() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("huge.txt");
    // One line: 120 MB of words, then a short second text. Written in pieces: this process's
    // own RSS when it spawns the child counts in the child's maximum until exec.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        let piece = "words in a very long document, ".repeat(1 << 15); // ≈ 1 MB
        for _ in 0..120 {
            f.write_all(piece.as_bytes()).unwrap();
        }
        f.write_all(b"\nshort\n").unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(["embed", "-m"])
        .arg(common::tiny_model())
        .args(["--device", "cpu", "--threads", "2", "--input"])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    assert!(err.contains("1 of 2 texts were longer"), "{err}");
    // Measured: ≈ 20 MB for a short text, ≈ 32 MB here (the line's kept 4 MiB prefix and the
    // reader's buffer); holding the line whole took ≈ 2 × 120 MB, tokenizing it whole ≈ 19 GB.
    let peak_mb = peak_rss_of_children_kb() / 1024;
    assert!(peak_mb < 96, "peak RSS {peak_mb} MB for a 120 MB line");
}
