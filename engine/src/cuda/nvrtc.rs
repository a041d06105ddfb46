//! The kernels compiled with NVRTC (loaded at run time, no GPU needed):
//! machine code for the GPU that is there, or PTX for the driver.

use std::ffi::CString;

use cudarc::nvrtc::{self, Ptx};

use super::KERNELS;
use crate::error::{EngineError, Result};

/// Compiles the kernels with NVRTC (no GPU needed): to a CUBIN for
/// `sm_{major}{minor}` when given one (no PTX JIT in the driver, so any
/// driver of the same CUDA major version loads it), else to PTX for
/// compute capability 8.0 (the bf16 tensor cores' first).
pub fn compile_kernels(arch: Option<(i32, i32)>) -> Result<KernelImage> {
    // SAFETY: only tries to open the library.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(EngineError::Device(
            "NVRTC (libnvrtc.so.12) was not found: install the CUDA runtime libraries (the CUDA image has \
             them) or add their directory to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let nvrtc_err = |what: &str, e: nvrtc::result::NvrtcError| EngineError::Device(format!("NVRTC {what}: {e:?}"));
    let src = CString::new(KERNELS).expect("no NUL in the kernel source");
    let name = CString::new("heterospec_kernels.cu").expect("no NUL");
    let prog = nvrtc::result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("program", e))?;
    let options: Vec<String> = vec![arch.map_or_else(
        || format!("--gpu-architecture=compute_{}{}", MIN_ARCH.0, MIN_ARCH.1),
        |(major, minor)| format!("--gpu-architecture=sm_{major}{minor}"),
    )];
    let text = |chars: Vec<std::ffi::c_char>| -> String {
        let bytes: Vec<u8> = chars.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    // SAFETY: `prog` is a live program, destroyed once below.
    let out = unsafe {
        match nvrtc::result::compile_program(prog, &options) {
            Err(e) => {
                let log = nvrtc::result::get_program_log(prog).map(text).unwrap_or_default();
                Err(EngineError::Device(format!(
                    "compiling the GPU kernels ({}) failed: {e:?}\n{log}",
                    options.join(" ")
                )))
            }
            Ok(()) if arch.is_some() => {
                let mut size = 0usize;
                nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| nvrtc_err("CUBIN size", e))
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map_err(|e| nvrtc_err("CUBIN", e))
                            .map(|()| KernelImage::Cubin(cubin))
                    })
            }
            Ok(()) => nvrtc::result::get_ptx(prog)
                .map(|p| KernelImage::Ptx(text(p)))
                .map_err(|e| nvrtc_err("PTX", e)),
        }
    };
    // SAFETY: created above, not used after.
    let _ = unsafe { nvrtc::result::destroy_program(prog) };
    out
}

/// The oldest compute capability the kernels run on (Ampere: `mma.sync`
/// on bf16).
pub const MIN_ARCH: (i32, i32) = (8, 0);

/// Compiled kernels.
#[derive(Debug, Clone)]
pub enum KernelImage {
    /// Machine code for one architecture (an ELF image).
    Cubin(Vec<u8>),
    /// PTX text, compiled by the driver when loaded.
    Ptx(String),
}

impl From<KernelImage> for Ptx {
    fn from(k: KernelImage) -> Ptx {
        match k {
            KernelImage::Cubin(bytes) => Ptx::from_binary(bytes),
            KernelImage::Ptx(text) => Ptx::from_src(text),
        }
    }
}
