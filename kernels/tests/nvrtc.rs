//! Every CUDA kernel source compiles with NVRTC to an sm_90 (H100/H200) cubin, and no kernel on
//! the hot path spills registers. Needs no GPU: NVRTC is a library, and scripts/test.sh fetches
//! it from NVIDIA's PyPI wheel (scripts/fetch-cuda-tools.sh) and sets `LD_LIBRARY_PATH`,
//! `TANDEM_CUDA_INCLUDE` and `TANDEM_REQUIRE_NVRTC=1`. Run by plain `cargo test` on a machine
//! without NVRTC, it says so and checks nothing, unless `TANDEM_REQUIRE_NVRTC=1`, which makes a
//! missing NVRTC a failure (CI).

use kernels::cuda::{compile, full_source, nvrtc_available, parse_ptxas_report, HOT_KERNELS, SOURCES};

fn includes() -> Vec<String> {
    std::env::var("TANDEM_CUDA_INCLUDE").map(|d| vec![d]).unwrap_or_default()
}

#[test]
fn every_kernel_compiles_for_sm90_without_spills() {
    if !nvrtc_available() {
        assert!(
            std::env::var("TANDEM_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "TANDEM_REQUIRE_NVRTC=1 but no libnvrtc.so.12 can be loaded: run scripts/fetch-cuda-tools.sh and put \
             .cache/cuda/lib on LD_LIBRARY_PATH"
        );
        eprintln!("nvrtc: no NVRTC library here; the kernel compile check is skipped (scripts/test.sh runs it)");
        return;
    }
    let mut reports = Vec::new();
    for (name, headers, src) in SOURCES {
        let compiled =
            compile(name, &full_source(headers, src), "sm_90", &includes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(compiled.cubin.len() > 100, "{name}: empty cubin");
        let r = parse_ptxas_report(&compiled.log);
        assert!(!r.is_empty(), "{name}: no ptxas report in the NVRTC log:\n{}", compiled.log);
        reports.extend(r);
    }
    println!("{:<34} {:>5} {:>6} {:>7} {:>7} {:>6}", "kernel (sm_90)", "regs", "smem", "spill>", "spill<", "stack");
    for r in &reports {
        println!(
            "{:<34} {:>5} {:>6} {:>7} {:>7} {:>6}",
            r.kernel, r.registers, r.shared_bytes, r.spill_stores, r.spill_loads, r.stack_bytes
        );
    }
    for hot in HOT_KERNELS {
        let r = reports
            .iter()
            .find(|r| r.kernel == *hot)
            .unwrap_or_else(|| panic!("hot kernel {hot} is not in any compiled source"));
        assert!(r.spill_stores == 0 && r.spill_loads == 0, "{hot} spills registers: {r:?}");
        assert!(r.registers > 0, "{hot}: no register count parsed: {r:?}");
    }
}

#[test]
fn a_kernel_with_an_error_reports_the_compiler_log() {
    if !nvrtc_available() {
        return;
    }
    let e = compile("broken", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_90", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken") && e.contains("undefined_name"), "{e}");
}

#[test]
fn the_ptxas_report_is_parsed() {
    let log = "ptxas info    : 0 bytes gmem\n\
               ptxas info    : Compiling entry function 'gelu_forward_f32' for 'sm_90'\n\
               ptxas info    : Function properties for gelu_forward_f32\n\
               \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 18 registers, 1024 bytes smem, 376 bytes cmem[0]\n";
    let r = parse_ptxas_report(log);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (
            r[0].kernel.as_str(),
            r[0].registers,
            r[0].shared_bytes,
            r[0].spill_stores,
            r[0].spill_loads,
            r[0].stack_bytes
        ),
        ("gelu_forward_f32", 18, 1024, 4, 12, 8)
    );
}
