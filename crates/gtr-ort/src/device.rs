//! The execution providers a run can ask for (`--device`), by name. The
//! backend registers them ([`crate::OrtModel`]); precisions are checked
//! against them ([`crate::precision_choice`]). With the `clap` feature a
//! [`Device`] is a `clap::ValueEnum`, so a command line lists them by itself.

/// Which execution provider runs the graphs. `Cpu`, `Cuda` and `TensorRt`
/// are strict; `Auto` tries the GPU providers compiled in and falls back
/// to the CPU, recording what really ran.
///
/// The CLI takes these by [`Device::name`] (`--device`); adding a provider
/// means a variant here, its arm in `register_device` and a Cargo
/// feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Device {
    Cpu,
    Cuda,
    #[cfg_attr(feature = "clap", value(name = "tensorrt"))]
    TensorRt,
    Auto,
}

impl Device {
    /// Every device, in the order `--device` lists them.
    pub const ALL: [Device; 4] = [Device::Cpu, Device::Cuda, Device::TensorRt, Device::Auto];

    /// The name `--device` takes and run.json records.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::TensorRt => "tensorrt",
            Device::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// A [`Device::name`] (`--device`).
    fn from_str(s: &str) -> Result<Self, String> {
        by_name(s, Device::ALL, Device::name)
    }
}

/// The one of `all` whose `name` is `s`, or an error listing the names.
pub(crate) fn by_name<T: Copy, const N: usize>(
    s: &str,
    all: [T; N],
    name: fn(T) -> &'static str,
) -> Result<T, String> {
    all.into_iter().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<&str> = all.into_iter().map(name).collect();
        format!("`{s}` is not one of {}", names.join(", "))
    })
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
