//! Builds the vendored detector (libfacedetection) with the SIMD its source has for the target:
//! AVX2 and FMA on x86-64 (the library checks at run time that the CPU has them before a call,
//! see `available`), NEON on 64-bit ARM, plain C++ elsewhere. The plain build is 3 to 4 times
//! slower (measured on the test photos at 128 to 256 px), too slow for a check before each call.

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include("libfacedetection")
        .files([
            "libfacedetection/facedetectcnn.cpp",
            "libfacedetection/facedetectcnn-model.cpp",
            "libfacedetection/facedetectcnn-data.cpp",
            "libfacedetection/shim.cpp",
        ])
        .opt_level(3)
        .flag_if_supported("-std=c++11")
        .warnings(false);
    match arch.as_str() {
        "x86_64" => {
            build
                .define("_ENABLE_AVX2", None)
                .flag("-mavx2")
                .flag("-mfma");
        }
        "aarch64" => {
            build.define("_ENABLE_NEON", None);
        }
        _ => {}
    }
    for f in [
        "facedetectcnn.cpp",
        "facedetectcnn-model.cpp",
        "facedetectcnn-data.cpp",
        "facedetectcnn.h",
        "shim.cpp",
    ] {
        println!("cargo:rerun-if-changed=libfacedetection/{f}");
    }
    build.compile("liveness_facedetect");
}
