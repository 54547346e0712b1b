//! The syntax tree of a `.gtr` file, as written: names are not yet resolved
//! and numbers may still be expressions over parameters.

use super::diagnostic::Span;

/// A name with the place it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `//`: floor division.
    FloorDiv,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::FloorDiv => "//",
            BinaryOp::Rem => "%",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }
}

/// An expression: a number, or a condition on a grid cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

impl Expr {
    /// Its operators and operands, nested ones included: what evaluating
    /// it once costs.
    pub fn parts(&self) -> usize {
        1 + match &self.kind {
            ExprKind::Unary(_, e) => e.parts(),
            ExprKind::Binary(_, a, b) => a.parts() + b.parts(),
            ExprKind::Call(_, args) => args.iter().map(Expr::parts).sum(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Number(f64),
    Bool(bool),
    /// `all`: every cell.
    All,
    /// `rest`: cells no earlier stage took.
    Rest,
    Name(String),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `abs(x)`: a function by name (checked against `expr::Func`).
    Call(Ident, Vec<Expr>),
}

/// One declaration or stage, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Param {
        name: Ident,
        value: Expr,
    },
    Grid {
        height: usize,
        width: usize,
        span: Span,
    },
    Partition {
        levels: Expr,
        prefix: Option<Ident>,
        span: Span,
    },
    Set {
        name: Ident,
        cells: Expr,
    },
    Setting(Setting),
    Stage(StageAst),
}

/// A clause that is a default at top level and an override inside a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Diffusion(DiffusionAst),
    Cfg(CfgAst),
    Temperature(Expr),
    /// `clip_timesteps T`: the largest training-chain timestep a respaced
    /// chain keeps.
    ClipTimesteps(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageAst {
    pub name: Ident,
    pub span: Span,
    pub clauses: Vec<StageClause>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StageClause {
    Tokens(Expr),
    Order(OrderAst),
    Steps(StepCountAst),
    Fts(FtsAst),
    Setting(Setting),
}

impl StageClause {
    /// The keyword that starts the clause, for "written twice" errors.
    pub fn keyword(&self) -> &'static str {
        match self {
            StageClause::Tokens(_) => "tokens",
            StageClause::Order(_) => "order",
            StageClause::Steps(s) => match s.count {
                StepCountKind::Rate(..) => "rate",
                _ => "steps",
            },
            StageClause::Fts(_) => "fts",
            StageClause::Setting(Setting::Diffusion(_)) => "diffusion",
            StageClause::Setting(Setting::Cfg(_)) => "cfg",
            StageClause::Setting(Setting::Temperature(_)) => "temperature",
            StageClause::Setting(Setting::ClipTimesteps(_)) => "clip_timesteps",
        }
    }
}

/// A closed set of words of the language with one meaning each. The
/// implementation is the one list of an enum's words: the parser reads them
/// with [`Vocabulary::from_name`], errors name them with
/// [`Vocabulary::prose`], and a test checks each against the grammar.
pub trait Vocabulary: Copy + PartialEq + std::fmt::Debug + 'static {
    /// Every value, in the order errors and docs list them.
    const ALL: &'static [Self];
    /// What one of the words is, for errors ("a selector"), if a noun helps.
    const NOUN: Option<&'static str>;

    /// The words as written in a schedule (keywords separated by a space).
    fn name(self) -> &'static str;

    /// The value written `words` (keywords separated by one space).
    fn from_name(words: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == words)
    }

    /// "`high_freq`, `low_freq`, `random` or `all`".
    fn choices() -> String {
        let names: Vec<String> = Self::ALL
            .iter()
            .map(|v| format!("`{}`", v.name()))
            .collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.concat(),
        }
    }

    /// "a selector (`high_freq`, `low_freq`, `random` or `all`)".
    fn prose() -> String {
        match Self::NOUN {
            Some(noun) => format!("{noun} ({})", Self::choices()),
            None => Self::choices(),
        }
    }
}

/// A named order of a stage's tokens (`order random`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    Random,
    Raster,
    Halton { roll: bool },
    Subsample,
}

impl Vocabulary for OrderKind {
    const ALL: &'static [Self] = &[
        OrderKind::Random,
        OrderKind::Raster,
        OrderKind::Halton { roll: false },
        OrderKind::Halton { roll: true },
        OrderKind::Subsample,
    ];
    const NOUN: Option<&'static str> = Some("an order");

    fn name(self) -> &'static str {
        match self {
            OrderKind::Random => "random",
            OrderKind::Raster => "raster",
            OrderKind::Halton { roll: false } => "halton",
            OrderKind::Halton { roll: true } => "halton roll",
            OrderKind::Subsample => "subsample",
        }
    }
}

/// How `order by` breaks ties between tokens of equal key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ties {
    /// The stage's seeded random order (the default).
    #[default]
    Random,
    /// Ascending token index.
    Raster,
}

impl Vocabulary for Ties {
    const ALL: &'static [Self] = &[Ties::Random, Ties::Raster];
    const NOUN: Option<&'static str> = Some("a tie-break");

    fn name(self) -> &'static str {
        match self {
            Ties::Random => "random",
            Ties::Raster => "raster",
        }
    }
}

/// An `order` clause as written.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderRule {
    /// `order random`, `order halton roll`, ...
    Named(OrderKind),
    /// `order by KEY [then TIES]`.
    By { key: Expr, ties: Ties },
    /// `order list [t1, t2, ...]`: token indices, first revealed first.
    List(Vec<Expr>),
    /// `order file "PATH"`; `span` is the quoted path's.
    File { path: String, span: Span },
    /// `order adaptive by SELECTOR`: chosen at run time by FTS score
    /// (the compiler admits `high_freq` and `low_freq` only).
    Adaptive(Selector),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderAst {
    pub rule: OrderRule,
    pub span: Span,
}

/// How a stage's tokens are spread over its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distribution {
    /// MAR's cosine rule (mar.md §2.2) applied to the stage's tokens.
    Cosine,
    /// As equal as integers allow.
    #[default]
    Uniform,
    /// Halton-MaskGIT's arccos rule (mar.md §6.2).
    Arccos,
}

impl Vocabulary for Distribution {
    const ALL: &'static [Self] = &[
        Distribution::Cosine,
        Distribution::Uniform,
        Distribution::Arccos,
    ];
    const NOUN: Option<&'static str> = Some("a distribution");

    fn name(self) -> &'static str {
        match self {
            Distribution::Cosine => "cosine",
            Distribution::Uniform => "uniform",
            Distribution::Arccos => "arccos",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepCountKind {
    /// `steps N [distribution]`
    Steps(Expr, Distribution),
    /// `rate R [distribution]`: R tokens per step on average.
    Rate(Expr, Distribution),
    /// `steps [a, b, c]`: exact tokens per step.
    List(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepCountAst {
    pub count: StepCountKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampShape {
    Linear,
    Cosine,
}

impl Vocabulary for RampShape {
    const ALL: &'static [Self] = &[RampShape::Linear, RampShape::Cosine];
    const NOUN: Option<&'static str> = None;

    fn name(self) -> &'static str {
        match self {
            RampShape::Linear => "linear",
            RampShape::Cosine => "cosine",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round half to even (as Python and numpy do).
    #[default]
    Round,
    /// Round down (as `int()` does for DiSA's chain index).
    Floor,
}

impl Vocabulary for Rounding {
    const ALL: &'static [Self] = &[Rounding::Round, Rounding::Floor];
    const NOUN: Option<&'static str> = None;

    fn name(self) -> &'static str {
        match self {
            Rounding::Round => "round",
            Rounding::Floor => "floor",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiffusionKind {
    Constant(Expr),
    Ramp {
        shape: RampShape,
        from: Expr,
        to: Expr,
        rounding: Rounding,
        across: Option<(Ident, Ident)>,
    },
    List(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionAst {
    pub kind: DiffusionKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    HighFreq,
    LowFreq,
    Random,
    All,
}

impl Selector {
    /// [`Vocabulary::name`], for callers that do not import the trait.
    pub fn name(self) -> &'static str {
        Vocabulary::name(self)
    }
}

impl Vocabulary for Selector {
    const ALL: &'static [Self] = &[
        Selector::HighFreq,
        Selector::LowFreq,
        Selector::Random,
        Selector::All,
    ];
    const NOUN: Option<&'static str> = Some("a selector");

    fn name(self) -> &'static str {
        match self {
            Selector::HighFreq => "high_freq",
            Selector::LowFreq => "low_freq",
            Selector::Random => "random",
            Selector::All => "all",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FtsAst {
    /// The fraction β; `None` for `fts all`.
    pub fraction: Option<Expr>,
    pub selector: Selector,
    pub steps: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CfgKind {
    None,
    Constant(Expr),
    Linear(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CfgAst {
    pub kind: CfgKind,
    pub span: Span,
}

/// A whole file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleAst {
    pub items: Vec<Item>,
}
