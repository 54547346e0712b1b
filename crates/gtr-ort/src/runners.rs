//! How the graphs of a loaded bundle are run: the choices behind
//! `--sampler`, `--backbone`, `--head` and `--vae`.

/// Where diffusion chains run (`--sampler`): the bundle's sampler graph
/// (one call per MAR step, state on the device), the host (one head call
/// per tick, the update on the CPU), the bundle's tick graph (one call per
/// tick on bound tensors, CUDA graphs replayed on CUDA; models/README.md,
/// "The optional tick graph"), or
/// `Auto`: the sampler graph when the bundle has one and a GPU provider runs
/// it, the host on the CPU provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ChainRunner {
    #[default]
    Auto,
    Host,
    Graph,
    Ticks,
}

impl ChainRunner {
    /// Every choice, in the order `--sampler` lists them.
    pub const ALL: [ChainRunner; 4] = [
        ChainRunner::Auto,
        ChainRunner::Host,
        ChainRunner::Graph,
        ChainRunner::Ticks,
    ];

    /// The name `--sampler` takes.
    pub fn name(self) -> &'static str {
        match self {
            ChainRunner::Auto => "auto",
            ChainRunner::Host => "host",
            ChainRunner::Graph => "graph",
            ChainRunner::Ticks => "ticks",
        }
    }
}

impl std::str::FromStr for ChainRunner {
    type Err = String;

    /// A [`ChainRunner::name`] (`--sampler`).
    fn from_str(s: &str) -> Result<Self, String> {
        crate::device::by_name(s, ChainRunner::ALL, ChainRunner::name)
    }
}

/// How the backbone runs (`--backbone`): `Fused`, the bundle's backbone
/// graph (encoder and decoder in one call, only the predicted tokens' z
/// returned); `Split`, the two graphs with z gathered on the host; or
/// `Auto`: fused when the bundle has the graph and a GPU provider runs it,
/// split on the CPU provider (where it has not been shown faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BackboneRunner {
    #[default]
    Auto,
    Fused,
    Split,
}

impl BackboneRunner {
    /// Every choice, in the order `--backbone` lists them.
    pub const ALL: [BackboneRunner; 3] = [
        BackboneRunner::Auto,
        BackboneRunner::Fused,
        BackboneRunner::Split,
    ];

    /// The name `--backbone` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackboneRunner::Auto => "auto",
            BackboneRunner::Fused => "fused",
            BackboneRunner::Split => "split",
        }
    }
}

impl std::str::FromStr for BackboneRunner {
    type Err = String;

    /// A [`BackboneRunner::name`] (`--backbone`).
    fn from_str(s: &str) -> Result<Self, String> {
        crate::device::by_name(s, BackboneRunner::ALL, BackboneRunner::name)
    }
}

/// How the diffusion head runs on the host chains (`--head`): `Split`, the
/// bundle's two parts (models/split_head.py) in every step, the (t, z) part
/// once per group of ticks; `Whole`, the head graph once per tick; or
/// `Auto`: the parts where the bundle has them in the run's precision, in
/// steps of at most [`gtr_engine::SPLIT_TICK_ROWS`] head rows a tick (where
/// they were measured to pay), else the whole head. The sampler and tick
/// graphs hold the whole head and are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum HeadRunner {
    #[default]
    Auto,
    Whole,
    Split,
}

impl HeadRunner {
    /// Every choice, in the order `--head` lists them.
    pub const ALL: [HeadRunner; 3] = [HeadRunner::Auto, HeadRunner::Whole, HeadRunner::Split];

    /// The name `--head` takes.
    pub fn name(self) -> &'static str {
        match self {
            HeadRunner::Auto => "auto",
            HeadRunner::Whole => "whole",
            HeadRunner::Split => "split",
        }
    }
}

impl std::str::FromStr for HeadRunner {
    type Err = String;

    /// A [`HeadRunner::name`] (`--head`).
    fn from_str(s: &str) -> Result<Self, String> {
        crate::device::by_name(s, HeadRunner::ALL, HeadRunner::name)
    }
}

/// When a batch's VAE decode runs (`--vae`): `Overlap`, on a thread of
/// its own while the next batch's MAR steps run (the model's
/// [`gtr_engine::MarModel::image_decoder`]; with the PNGs encoded there
/// too); `Inline`, after the batch's MAR steps, before the next batch
/// begins; or `Auto`: overlapped on GPU providers, inline on the CPU
/// provider (where both share the same cores: measured level to 5%
/// faster on mar-tiny, README) and where the model
/// cannot decode beside sampling (its tick graph capturing CUDA graphs).
/// The images are the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum VaeRunner {
    #[default]
    Auto,
    Overlap,
    Inline,
}

impl VaeRunner {
    /// Every choice, in the order `--vae` lists them.
    pub const ALL: [VaeRunner; 3] = [VaeRunner::Auto, VaeRunner::Overlap, VaeRunner::Inline];

    /// The name `--vae` takes.
    pub fn name(self) -> &'static str {
        match self {
            VaeRunner::Auto => "auto",
            VaeRunner::Overlap => "overlap",
            VaeRunner::Inline => "inline",
        }
    }

    /// Whether decodes overlap sampling on a model run by `provider`
    /// ([`gtr_engine::MarModel::execution_provider`]).
    pub fn overlaps(self, provider: &str) -> bool {
        match self {
            VaeRunner::Auto => provider != "cpu",
            VaeRunner::Overlap => true,
            VaeRunner::Inline => false,
        }
    }
}

impl std::str::FromStr for VaeRunner {
    type Err = String;

    /// A [`VaeRunner::name`] (`--vae`).
    fn from_str(s: &str) -> Result<Self, String> {
        crate::device::by_name(s, VaeRunner::ALL, VaeRunner::name)
    }
}

/// Why `--head` (`head`) or `--sampler-ticks` (`ticks_per_call`) cannot
/// go with `--sampler` (`chains`), if they cannot: the head choice is how
/// the *host* chains run the head (the sampler and tick graphs hold the
/// whole head), and ticks per call are the chain graphs' (the host path
/// makes one head call per tick).
pub fn runners_conflict(
    chains: ChainRunner,
    head: HeadRunner,
    ticks_per_call: Option<u32>,
) -> Option<String> {
    if head != HeadRunner::Auto && matches!(chains, ChainRunner::Graph | ChainRunner::Ticks) {
        return Some(format!(
            "--head {} chooses how the host chains run the diffusion head; --sampler {} runs the chains in a graph holding the whole head: leave --head out, or use --sampler host",
            head.name(),
            chains.name()
        ));
    }
    if ticks_per_call.is_some() && chains == ChainRunner::Host {
        return Some(
            "--sampler-ticks sets the ticks per call of the sampler or tick graph; --sampler host makes one head call per tick: leave one out".into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vae_overlaps_on_gpu_providers_unless_told() {
        for provider in ["cuda", "tensorrt"] {
            assert!(VaeRunner::Auto.overlaps(provider));
            assert!(!VaeRunner::Inline.overlaps(provider));
        }
        assert!(!VaeRunner::Auto.overlaps("cpu"));
        assert!(VaeRunner::Overlap.overlaps("cpu"));
    }

    #[test]
    fn runner_choices_that_cannot_go_together_are_named() {
        let no = |c, h, t| runners_conflict(c, h, t).is_none();
        assert!(no(ChainRunner::Host, HeadRunner::Split, None));
        assert!(no(ChainRunner::Graph, HeadRunner::Auto, Some(2)));
        assert!(no(ChainRunner::Auto, HeadRunner::Whole, Some(2)));
        let e = runners_conflict(ChainRunner::Graph, HeadRunner::Split, None).unwrap();
        assert!(
            e.contains("--head split") && e.contains("--sampler graph"),
            "{e}"
        );
        assert!(runners_conflict(ChainRunner::Ticks, HeadRunner::Whole, None).is_some());
        let e = runners_conflict(ChainRunner::Host, HeadRunner::Auto, Some(3)).unwrap();
        assert!(e.contains("--sampler-ticks"), "{e}");
    }

    /// Every choice's name reads back as it (Python passes these strings).
    #[test]
    fn names_read_back() {
        fn check<T: std::str::FromStr + PartialEq + std::fmt::Debug + Copy>(
            all: &[T],
            name: fn(T) -> &'static str,
        ) {
            for &choice in all {
                assert_eq!(name(choice).parse::<T>().ok(), Some(choice));
            }
            assert!("nope".parse::<T>().is_err());
        }
        check(&ChainRunner::ALL, ChainRunner::name);
        check(&BackboneRunner::ALL, BackboneRunner::name);
        check(&HeadRunner::ALL, HeadRunner::name);
        check(&VaeRunner::ALL, VaeRunner::name);
    }

    /// Every choice's name is the one the command line lists, so Python's
    /// strings and the flags agree (with the `clap` feature, which the
    /// gtr-run crate turns on).
    #[cfg(feature = "clap")]
    #[test]
    fn names_match_the_flags() {
        fn check<T: clap::ValueEnum + Copy>(all: &[T], name: fn(T) -> &'static str) {
            assert_eq!(all.len(), T::value_variants().len());
            for &choice in all {
                let listed = choice.to_possible_value().map(|v| v.get_name().to_string());
                assert_eq!(listed.as_deref(), Some(name(choice)));
            }
        }
        check(&ChainRunner::ALL, ChainRunner::name);
        check(&BackboneRunner::ALL, BackboneRunner::name);
        check(&HeadRunner::ALL, HeadRunner::name);
        check(&VaeRunner::ALL, VaeRunner::name);
    }
}
