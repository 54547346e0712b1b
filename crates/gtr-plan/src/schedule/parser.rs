//! Text → [`ScheduleAst`] with the pest grammar in `grammar/gtr.pest`.

use std::sync::{Arc, OnceLock};

use pest::Parser;
use pest::iterators::{Pair, Pairs};
use pest::pratt_parser::{Assoc, Op, PrattParser};

use super::ast::*;
use super::diagnostic::{Diagnostic, Source, Span, quoted};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/gtr.pest"]
struct GtrParser;

/// Parses a schedule's text. Syntax errors come back as a [`Diagnostic`]
/// pointing at the first place the text could not be read.
pub fn parse(source: &Arc<Source>) -> Result<ScheduleAst, Diagnostic> {
    super::diagnostic::refuse_lone_carriage_return(source, &source.text, None)?;
    check_nesting(source)?;
    let mut pairs =
        GtrParser::parse(Rule::schedule, &source.text).map_err(|e| syntax_error(source, e))?;
    let root = pairs.next().expect("pest returns the schedule rule");
    for expr in root
        .clone()
        .into_inner()
        .flatten()
        .filter(|p| p.as_rule() == Rule::expr)
    {
        let parts = expr.clone().into_inner().flatten().count();
        if parts > MAX_EXPR_PARTS {
            return Err(Diagnostic::new(
                source,
                span_of(&expr),
                format!(
                    "this expression has {parts} operators and operands; at most {MAX_EXPR_PARTS} are allowed"
                ),
            )
            .with_help("split it with `param` or `set` declarations"));
        }
    }
    for name in root
        .clone()
        .into_inner()
        .flatten()
        .filter(|p| p.as_rule() == Rule::ident)
    {
        let chars = name.as_str().len();
        if chars > MAX_NAME_CHARS {
            return Err(Diagnostic::new(
                source,
                span_of(&name),
                format!("this name has {chars} characters; at most {MAX_NAME_CHARS} are allowed"),
            )
            .with_help(
                "names of stages, parameters and sets are shown in plans and errors: shorten it",
            ));
        }
    }
    let builder = Builder { source };
    let mut items = Vec::new();
    for pair in root.into_inner() {
        if pair.as_rule() == Rule::EOI {
            break;
        }
        items.push(builder.item(pair)?);
    }
    Ok(ScheduleAst { items })
}

/// Every keyword of the grammar (the `keyword` rule of grammar/gtr.pest);
/// none may be used as a name.
pub const KEYWORDS: [&str; 41] = [
    "param",
    "grid",
    "partition",
    "checker",
    "as",
    "set",
    "stage",
    "tokens",
    "order",
    "random",
    "raster",
    "halton",
    "roll",
    "subsample",
    "steps",
    "rate",
    "cosine",
    "uniform",
    "arccos",
    "diffusion",
    "linear",
    "round",
    "floor",
    "across",
    "fts",
    "top",
    "by",
    "high_freq",
    "low_freq",
    "all",
    "rest",
    "cfg",
    "none",
    "constant",
    "temperature",
    "clip_timesteps",
    "and",
    "or",
    "not",
    "true",
    "false",
];

/// Deepest nesting of `(` and `[` a schedule may use.
const MAX_NESTING: usize = 64;
/// Most characters in a name (of a stage, parameter, set or function;
/// names are ASCII, so bytes).
pub const MAX_NAME_CHARS: usize = 64;
/// Most operators plus operands in one expression, nested ones included.
const MAX_EXPR_PARTS: usize = 500;

/// Refuses absurdly deep bracket nesting before the recursive parser sees
/// it. Comments and strings (`order file "…"`, which end at their line's
/// end as the grammar's do) hold no brackets.
fn check_nesting(source: &Arc<Source>) -> Result<(), Diagnostic> {
    let mut depth = 0usize;
    let (mut in_comment, mut in_string) = (false, false);
    for (pos, c) in source.text.char_indices() {
        let in_code = !in_comment && !in_string;
        match c {
            '\n' => (in_comment, in_string) = (false, false),
            '#' if !in_string => in_comment = true,
            '"' if !in_comment => in_string = !in_string,
            '(' | '[' if in_code => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::new(
                        source,
                        Span::new(pos, pos + 1),
                        format!("brackets nested more than {MAX_NESTING} deep"),
                    )
                    .with_help("simplify the expression, or split it with `param` or `set`"));
                }
            }
            ')' | ']' if in_code => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn span_of(pair: &Pair<Rule>) -> Span {
    let s = pair.as_span();
    Span::new(s.start(), s.end())
}

struct Builder<'a> {
    source: &'a Arc<Source>,
}

impl Builder<'_> {
    fn item(&self, pair: Pair<Rule>) -> Result<Item, Diagnostic> {
        let span = span_of(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        Ok(match rule {
            Rule::param_decl => {
                inner.next(); // keyword
                let name = ident(inner.next().unwrap());
                let value = self.expr(inner.next().unwrap());
                Item::Param { name, value }
            }
            Rule::grid_decl => {
                inner.next();
                let dims = inner.next().unwrap();
                let dims_span = span_of(&dims);
                let mut ints = dims.into_inner();
                let h = self.dimension(ints.next().unwrap())?;
                let w = self.dimension(ints.next().unwrap())?;
                if h * w > crate::grid::MAX_TOKENS {
                    return Err(Diagnostic::new(
                        self.source,
                        dims_span,
                        format!(
                            "a {h}x{w} grid has {} tokens; at most {} are supported",
                            h * w,
                            crate::grid::MAX_TOKENS
                        ),
                    ));
                }
                Item::Grid {
                    height: h,
                    width: w,
                    span: dims_span,
                }
            }
            Rule::partition_decl => {
                inner.next();
                inner.next(); // `checker`
                let levels = self.expr(inner.next().unwrap());
                let prefix = inner.nth(1).map(ident);
                Item::Partition {
                    levels,
                    prefix,
                    span,
                }
            }
            Rule::set_decl => {
                inner.next();
                let name = ident(inner.next().unwrap());
                let cells = self.expr(inner.next().unwrap());
                Item::Set { name, cells }
            }
            Rule::stage => {
                inner.next();
                let name = ident(inner.next().unwrap());
                let clauses = inner
                    .filter(|c| !matches!(c.as_rule(), Rule::open_brace | Rule::close_brace))
                    .map(|c| self.stage_clause(c))
                    .collect();
                Item::Stage(StageAst {
                    name,
                    span,
                    clauses,
                })
            }
            _ => Item::Setting(self.setting(rule, span, inner)),
        })
    }

    fn dimension(&self, pair: Pair<Rule>) -> Result<usize, Diagnostic> {
        let span = span_of(&pair);
        pair.as_str()
            .parse::<usize>()
            .ok()
            .filter(|&n| (1..=4096).contains(&n))
            .ok_or_else(|| {
                Diagnostic::new(self.source, span, "a grid side must be between 1 and 4096")
            })
    }

    fn stage_clause(&self, pair: Pair<Rule>) -> StageClause {
        let span = span_of(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        match rule {
            Rule::tokens_clause => {
                inner.next();
                StageClause::Tokens(self.expr(inner.next().unwrap()))
            }
            Rule::order_clause => {
                inner.next();
                let body = inner.next().unwrap();
                let rule = match body.as_rule() {
                    Rule::order_adaptive => {
                        OrderRule::Adaptive(words(body.into_inner().nth(2).unwrap()))
                    }
                    Rule::order_by => {
                        let mut parts = body.into_inner().skip(1); // `by`
                        let key = self.expr(parts.next().unwrap());
                        let ties = parts.nth(1).map(words).unwrap_or_default();
                        OrderRule::By { key, ties }
                    }
                    Rule::order_list => {
                        OrderRule::List(self.list(body.into_inner().nth(1).unwrap()))
                    }
                    Rule::order_file => {
                        let string = body.into_inner().nth(1).unwrap();
                        OrderRule::File {
                            span: span_of(&string),
                            path: string.into_inner().next().unwrap().as_str().to_string(),
                        }
                    }
                    _ => OrderRule::Named(words(body)),
                };
                StageClause::Order(OrderAst { rule, span })
            }
            Rule::steps_clause | Rule::rate_clause => {
                inner.next();
                let first = inner.next().unwrap();
                let count = if first.as_rule() == Rule::number_list {
                    StepCountKind::List(self.list(first))
                } else {
                    let value = self.expr(first);
                    let dist = inner.next().map(words).unwrap_or_default();
                    if rule == Rule::rate_clause {
                        StepCountKind::Rate(value, dist)
                    } else {
                        StepCountKind::Steps(value, dist)
                    }
                };
                StageClause::Steps(StepCountAst { count, span })
            }
            Rule::fts_clause => {
                inner.next();
                let head = inner.next().unwrap();
                let steps = self.expr(inner.nth(1).unwrap()); // after `->`
                let (fraction, selector) = match head.as_rule() {
                    Rule::fts_all => (None, Selector::All),
                    _ => {
                        let mut parts = head.into_inner();
                        parts.next(); // `top`
                        let fraction = self.fraction(parts.next().unwrap());
                        parts.next(); // `by`
                        (Some(fraction), words(parts.next().unwrap()))
                    }
                };
                StageClause::Fts(FtsAst {
                    fraction,
                    selector,
                    steps,
                    span,
                })
            }
            _ => StageClause::Setting(self.setting(rule, span, inner)),
        }
    }

    fn setting(&self, rule: Rule, span: Span, mut inner: Pairs<Rule>) -> Setting {
        inner.next(); // keyword
        match rule {
            Rule::diffusion_clause => {
                let body = inner.next().unwrap();
                let kind = match body.as_rule() {
                    Rule::number_list => DiffusionKind::List(self.list(body)),
                    Rule::diffusion_ramp => {
                        let mut parts = body.into_inner();
                        let shape = words(parts.next().unwrap());
                        let from = self.expr(parts.next().unwrap());
                        let to = self.expr(parts.nth(1).unwrap()); // after `->`
                        let mut rounding = Rounding::Round;
                        let mut across = None;
                        for part in parts {
                            match part.as_rule() {
                                Rule::rounding => rounding = words(part),
                                _ => {
                                    let mut names = part.into_inner();
                                    names.next();
                                    let first = ident(names.next().unwrap());
                                    let last = ident(names.next().unwrap());
                                    across = Some((first, last));
                                }
                            }
                        }
                        DiffusionKind::Ramp {
                            shape,
                            from,
                            to,
                            rounding,
                            across,
                        }
                    }
                    _ => DiffusionKind::Constant(self.expr(body)),
                };
                Setting::Diffusion(DiffusionAst { kind, span })
            }
            Rule::cfg_clause => {
                let body = inner.next().unwrap();
                let kind = match body.as_rule() {
                    Rule::cfg_none => CfgKind::None,
                    Rule::cfg_linear => {
                        CfgKind::Linear(self.expr(body.into_inner().nth(1).unwrap()))
                    }
                    _ => {
                        let e = body.into_inner().last().unwrap();
                        CfgKind::Constant(self.expr(e))
                    }
                };
                Setting::Cfg(CfgAst { kind, span })
            }
            Rule::temperature_clause => Setting::Temperature(self.expr(inner.next().unwrap())),
            Rule::clip_timesteps_clause => Setting::ClipTimesteps(self.expr(inner.next().unwrap())),
            r => unreachable!("setting {r:?}"),
        }
    }

    fn fraction(&self, pair: Pair<Rule>) -> Expr {
        let inner = pair.into_inner().next().unwrap();
        if inner.as_rule() == Rule::percent {
            let span = span_of(&inner);
            let number = inner.into_inner().next().unwrap();
            let value = number.as_str().parse::<f64>().unwrap_or(f64::NAN);
            Expr {
                kind: ExprKind::Number(value / 100.0),
                span,
            }
        } else {
            self.expr(inner)
        }
    }

    fn list(&self, pair: Pair<Rule>) -> Vec<Expr> {
        pair.into_inner().map(|e| self.expr(e)).collect()
    }

    fn expr(&self, pair: Pair<Rule>) -> Expr {
        pratt()
            .map_primary(|p| self.primary(p))
            .map_prefix(|op, rhs| {
                let span = span_of(&op).to(rhs.span);
                let op = if op.as_rule() == Rule::neg {
                    UnaryOp::Neg
                } else {
                    UnaryOp::Not
                };
                Expr {
                    kind: ExprKind::Unary(op, Box::new(rhs)),
                    span,
                }
            })
            .map_infix(|lhs, op, rhs| {
                let op = match op.as_rule() {
                    Rule::add => BinaryOp::Add,
                    Rule::sub => BinaryOp::Sub,
                    Rule::mul => BinaryOp::Mul,
                    Rule::div => BinaryOp::Div,
                    Rule::fdiv => BinaryOp::FloorDiv,
                    Rule::rem => BinaryOp::Rem,
                    Rule::eq => BinaryOp::Eq,
                    Rule::ne => BinaryOp::Ne,
                    Rule::lt => BinaryOp::Lt,
                    Rule::le => BinaryOp::Le,
                    Rule::gt => BinaryOp::Gt,
                    Rule::ge => BinaryOp::Ge,
                    Rule::and => BinaryOp::And,
                    Rule::or => BinaryOp::Or,
                    r => unreachable!("infix {r:?}"),
                };
                let span = lhs.span.to(rhs.span);
                Expr {
                    kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                    span,
                }
            })
            .parse(pair.into_inner())
    }

    fn primary(&self, pair: Pair<Rule>) -> Expr {
        let span = span_of(&pair);
        let kind = match pair.as_rule() {
            Rule::number => ExprKind::Number(pair.as_str().parse().unwrap_or(f64::NAN)),
            Rule::boolean => ExprKind::Bool(pair.as_str() == "true"),
            Rule::kw_all => ExprKind::All,
            Rule::kw_rest => ExprKind::Rest,
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            Rule::call => {
                let mut parts = pair.into_inner();
                let name = ident(parts.next().unwrap());
                ExprKind::Call(name, parts.map(|e| self.expr(e)).collect())
            }
            Rule::expr => return self.expr(pair),
            r => unreachable!("primary {r:?}"),
        };
        Expr { kind, span }
    }
}

fn ident(pair: Pair<Rule>) -> Ident {
    Ident {
        name: pair.as_str().to_string(),
        span: span_of(&pair),
    }
}

/// The value of a [`Vocabulary`] a rule of keywords spells (the grammar
/// admits only its words; a test checks they agree).
fn words<V: Vocabulary>(pair: Pair<Rule>) -> V {
    let text: Vec<&str> = pair.into_inner().map(|k| k.as_str()).collect();
    let text = text.join(" ");
    V::from_name(&text).unwrap_or_else(|| unreachable!("`{text}` is not {}", V::prose()))
}

fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: OnceLock<PrattParser<Rule>> = OnceLock::new();
    PRATT.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::prefix(Rule::not))
            .op(Op::infix(Rule::eq, Assoc::Left)
                | Op::infix(Rule::ne, Assoc::Left)
                | Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left)
                | Op::infix(Rule::div, Assoc::Left)
                | Op::infix(Rule::fdiv, Assoc::Left)
                | Op::infix(Rule::rem, Assoc::Left))
            .op(Op::prefix(Rule::neg))
    })
}

/// What a file may start with: the grammar's `item`s, or its end.
const TOP_LEVEL_ITEMS: [Rule; 10] = [
    Rule::param_decl,
    Rule::grid_decl,
    Rule::partition_decl,
    Rule::set_decl,
    Rule::stage,
    Rule::diffusion_clause,
    Rule::cfg_clause,
    Rule::temperature_clause,
    Rule::clip_timesteps_clause,
    Rule::EOI,
];

/// Turns a pest error into a diagnostic that names what was expected in prose.
fn syntax_error(source: &Arc<Source>, err: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let found = describe_found(&source.text, pos);
    let end = pos + found.1;
    let message = match &err.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let prose = |rules: &[Rule]| -> Vec<String> {
                rules.iter().filter_map(|r| rule_prose(*r)).collect()
            };
            let mut names = prose(positives);
            // At the first item pest names only the whole schedule, which
            // has no prose: the items are what was expected.
            if names.is_empty() && source.text[..pos].trim().is_empty() {
                names = prose(&TOP_LEVEL_ITEMS);
            }
            names.sort_unstable();
            names.dedup();
            match names.len() {
                0 => format!("unexpected {}", found.0),
                1 => format!("expected {}, found {}", names[0], found.0),
                _ => {
                    let (last, rest) = names.split_last().unwrap();
                    format!(
                        "expected {} or {}, found {}",
                        rest.join(", "),
                        last,
                        found.0
                    )
                }
            }
        }
        ErrorVariant::CustomError { message } => message.clone(),
    };
    let positives = match &err.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.as_slice(),
        ErrorVariant::CustomError { .. } => &[],
    };
    if let Some(name) = non_ascii_name(&source.text, pos, positives) {
        return Diagnostic::new(
            source,
            name,
            format!(
                "`{}` is not a name",
                quoted(&source.text[name.start..name.end])
            ),
        )
        .with_help("names are written with ASCII letters, digits and `_`");
    }
    let diag = Diagnostic::new(source, Span::new(pos, end.max(pos)), message);
    match hint_for(&source.text, pos, positives) {
        Some(h) => diag.with_help(h),
        None => diag,
    }
}

/// A short description of the text at `pos` and its length in bytes.
fn describe_found(text: &str, pos: usize) -> (String, usize) {
    let rest = text.get(pos..).unwrap_or("");
    if rest.is_empty() {
        return ("end of file".into(), 0);
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
        .collect();
    if !word.is_empty() {
        return (format!("`{}`", quoted(&word)), word.len());
    }
    let c = rest.chars().next().unwrap();
    (format!("`{}`", quoted(&rest[..c.len_utf8()])), c.len_utf8())
}

/// The last `{` before `pos` that no `}` closes (comments skipped), and
/// the name of the stage it opens.
fn unclosed_brace(text: &str, pos: usize) -> Option<(usize, &str)> {
    let mut open = Vec::new();
    let mut in_comment = false;
    for (k, c) in text[..pos.min(text.len())].char_indices() {
        match c {
            '\n' => in_comment = false,
            '#' => in_comment = true,
            '{' if !in_comment => open.push(k),
            '}' if !in_comment => {
                open.pop();
            }
            _ => {}
        }
    }
    let at = *open.last()?;
    let name = text[..at].split_whitespace().last().unwrap_or("");
    Some((at, name))
}

/// A `help` line for a syntax error at `pos`, where `positives` were expected.
fn hint_for(text: &str, pos: usize, positives: &[Rule]) -> Option<String> {
    let expected_name = positives.contains(&Rule::ident);
    let rest = text.get(pos..).unwrap_or("");
    let word: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();

    let stage_only = ["tokens", "order", "steps", "rate", "fts"];
    if !expected_name && stage_only.contains(&word.as_str()) && !text[..pos].contains('{') {
        return Some(format!(
            "`{word}` is a stage clause: write it inside `stage NAME {{ ... }}`"
        ));
    }
    let top_level = ["stage", "param", "partition", "set", "grid"];
    let at_end = rest.trim().is_empty() && positives.contains(&Rule::close_brace);
    if let Some((at, name)) = unclosed_brace(text, pos)
        .filter(|_| !expected_name && (at_end || top_level.contains(&word.as_str())))
    {
        let line = text[..at].matches('\n').count() + 1;
        return Some(format!(
            "the `{{` of stage `{name}` on line {line} is not closed: is its `}}` missing?"
        ));
    }
    // `top 10 % by`, `top b% by`: `%` read as the remainder operator (on
    // the line of `by`, not in a comment).
    let line = &text[line_start(text, pos)..pos];
    if word == "by" && line.trim_end().ends_with('%') && !line.contains('#') {
        return Some(
            "a percentage is a number followed directly by `%` (`top 10%`); otherwise write a fraction (`top 0.1`, `top p / 100`)"
                .into(),
        );
    }
    if expected_name && KEYWORDS.contains(&word.as_str()) {
        return Some(format!(
            "`{word}` is a keyword and cannot be used as a name here; choose another name"
        ));
    }
    if rest.starts_with("&&")
        || rest.starts_with("||")
        || rest.starts_with('!') && !rest.starts_with("!=")
    {
        return Some("conditions are combined with `and`, `or` and `not`".into());
    }
    if rest.starts_with(|c: char| !c.is_ascii() && c.is_alphanumeric()) {
        return Some("names are written with ASCII letters, digits and `_`".into());
    }
    if rest.starts_with('\'') {
        return Some("file names are written in double quotes: `\"order.txt\"`".into());
    }
    if rest.starts_with('"') && positives.contains(&Rule::string) {
        return Some(
            "this string is not closed on its line: a file name is written in double quotes, `\"order.txt\"`"
                .into(),
        );
    }
    // A misspelt keyword: where the error is (`oder raster`), or just
    // before it, read as a name (`cfg linar 3`).
    let before = text[..pos].trim_end();
    let previous = &before[before
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |(k, c)| k + c.len_utf8())..];
    for (misspelt, read) in [(word.as_str(), ":"), (previous, " is read as a name here:")] {
        if misspelt.is_empty() || KEYWORDS.contains(&misspelt) {
            continue;
        }
        let mut near = KEYWORDS
            .iter()
            .filter(|k| k.len() >= 3 && super::expr::at_most_one_edit(misspelt, k));
        if let (Some(k), None) = (near.next(), near.next()) {
            return Some(format!("`{misspelt}`{read} did you mean `{k}`?"));
        }
    }
    if rest.starts_with("=>") {
        return Some("a ramp is written with `->`: `diffusion linear 50 -> 20`".into());
    }
    if let Some(synopsis) = declaration_synopsis(text, pos, positives) {
        return Some(synopsis.into());
    }
    if positives.contains(&Rule::open_brace) {
        return Some("a stage is written `stage NAME { clauses }`: a name, then `{`".into());
    }
    if positives.contains(&Rule::fts_arrow) {
        return Some(
            "an `fts` clause ends with `-> T`, the diffusion steps of the chosen tokens: `fts top 10% by high_freq -> 50`"
                .into(),
        );
    }
    if !expected_name && word == "stage" {
        return Some(
            "a stage is written `stage NAME { clauses }`: check the name and the `{` after it"
                .into(),
        );
    }
    if rest.starts_with('=') && !rest.starts_with("==") {
        return Some("comparison for equality is written `==`".into());
    }
    None
}

/// Where a declaration refused as a whole (`param größe = 3`, the error
/// at `param`) has a name that is not ASCII: the first word from `pos` to
/// the end of its line (comments and strings skipped) with a non-ASCII
/// letter or digit, as its span. That name is the fault, not the layout.
fn non_ascii_name(text: &str, pos: usize, positives: &[Rule]) -> Option<Span> {
    declaration_synopsis(text, pos, positives)?;
    let line = text[pos..].lines().next().unwrap_or("");
    let code = line.split('#').next().unwrap_or("");
    let mut at = pos;
    for (k, part) in code.split('"').enumerate() {
        if k % 2 == 0 {
            let mut word_start = None;
            for (j, c) in part.char_indices().chain([(part.len(), ' ')]) {
                match (c.is_alphanumeric() || c == '_', word_start) {
                    (true, None) => word_start = Some(j),
                    (false, Some(w)) => {
                        if !part[w..j].is_ascii() {
                            return Some(Span::new(at + w, at + j));
                        }
                        word_start = None;
                    }
                    _ => {}
                }
            }
        }
        at += part.len() + 1;
    }
    None
}

/// The byte offset where the line holding offset `at` of `text` starts.
fn line_start(text: &str, at: usize) -> usize {
    text[..at].rfind('\n').map_or(0, |k| k + 1)
}

/// How the declaration in which a syntax error at `pos` lies is written,
/// when it is one of the top-level ones, told by the first word of its
/// line: `pos`'s line, or the line before when `pos` starts its line while
/// the parser (`positives`) still wanted the rest of a declaration.
fn declaration_synopsis(text: &str, pos: usize, positives: &[Rule]) -> Option<&'static str> {
    let mut start = line_start(text, pos);
    let new_item = positives
        .iter()
        .any(|r| matches!(r, Rule::stage | Rule::kw_stage | Rule::EOI));
    if text[start..pos].trim().is_empty() && !new_item && start > 0 {
        start = line_start(text, text[..start].trim_end().len());
    }
    let mut words = text[start..pos.max(start)]
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty());
    let head = match words.next() {
        Some(head) => head,
        None => text[start..]
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .find(|w| !w.is_empty())?,
    };
    // Another item begun on the line before `pos` (`grid 4x4 stage a { … }`):
    // the error is in that one, not in the declaration the line starts with.
    const ITEMS: [&str; 9] = [
        "stage",
        "param",
        "set",
        "partition",
        "grid",
        "cfg",
        "diffusion",
        "temperature",
        "clip_timesteps",
    ];
    if words.any(|w| ITEMS.contains(&w)) {
        return None;
    }
    Some(match head {
        "param" => "a parameter is written `param NAME = VALUE`, e.g. `param steps = 16`",
        "set" => "a set is written `set NAME = CONDITION`, e.g. `set edge = i == 0 or j == 0`",
        "partition" => {
            "a partition is written `partition checker(K)`, or `partition checker(K) as P` to name its sets P1 ... PK"
        }
        "grid" => "the grid is written `grid HxW`, e.g. `grid 16x16`",
        _ => return None,
    })
}

/// Prose for the rules an error may say were expected; `None` hides a rule.
/// Exhaustive, so that a new rule of the grammar cannot build without its
/// sentence (or an explicit `None`).
fn rule_prose(rule: Rule) -> Option<String> {
    let text = match rule {
        Rule::EOI => "end of file",
        Rule::close_brace => "`}`",
        Rule::open_brace => "`{`",
        Rule::fts_arrow => "`-> T`",
        Rule::ramp_arrow => "`->`",
        Rule::param_decl | Rule::kw_param => "`param`",
        Rule::grid_decl | Rule::kw_grid => "`grid`",
        Rule::partition_decl | Rule::kw_partition => "`partition`",
        Rule::set_decl | Rule::kw_set => "`set`",
        Rule::stage | Rule::kw_stage => "`stage`",
        Rule::kw_checker => "`checker`",
        Rule::kw_as => "`as`",
        Rule::tokens_clause | Rule::kw_tokens => "`tokens`",
        Rule::order_clause | Rule::kw_order => "`order`",
        Rule::steps_clause | Rule::kw_steps => "`steps`",
        Rule::rate_clause | Rule::kw_rate => "`rate`",
        Rule::fts_clause | Rule::kw_fts => "`fts`",
        Rule::diffusion_clause | Rule::kw_diffusion => "`diffusion`",
        Rule::cfg_clause | Rule::kw_cfg => "`cfg`",
        Rule::temperature_clause | Rule::kw_temperature => "`temperature`",
        Rule::clip_timesteps_clause | Rule::kw_clip_timesteps => "`clip_timesteps`",
        Rule::order_named => return Some(OrderKind::prose()),
        Rule::order_by => "`by`",
        Rule::order_adaptive | Rule::kw_adaptive => "`adaptive`",
        Rule::order_list | Rule::kw_list => "`list`",
        Rule::order_file | Rule::kw_file => "`file`",
        Rule::kw_then => "`then`",
        Rule::ties => return Some(Ties::prose()),
        Rule::string | Rule::string_text => "a file name in double quotes",
        Rule::kw_random => "`random`",
        Rule::kw_raster => "`raster`",
        Rule::kw_halton => "`halton`",
        Rule::kw_subsample => "`subsample`",
        Rule::kw_roll => "`roll`",
        Rule::distribution => return Some(Distribution::prose()),
        Rule::kw_cosine => "`cosine`",
        Rule::kw_uniform => "`uniform`",
        Rule::kw_arccos => "`arccos`",
        Rule::diffusion_ramp | Rule::ramp_shape => return Some(RampShape::prose()),
        Rule::kw_linear => "`linear`",
        Rule::rounding | Rule::kw_round | Rule::kw_floor => return Some(Rounding::prose()),
        Rule::across | Rule::kw_across => "`across`",
        Rule::fts_all | Rule::kw_all => "`all`",
        Rule::fts_top | Rule::kw_top => "`top`",
        Rule::kw_by => "`by`",
        Rule::selector | Rule::kw_high_freq | Rule::kw_low_freq => {
            return Some(Selector::prose());
        }
        Rule::cfg_none | Rule::kw_none => "`none`",
        Rule::cfg_linear => "`linear`",
        Rule::cfg_constant | Rule::kw_constant => "a guidance scale",
        Rule::grid_dims => "grid size like `16x16`",
        Rule::number_list => "a list like `[1, 2, 3]`",
        Rule::expr | Rule::number | Rule::boolean | Rule::fraction | Rule::percent => "a value",
        Rule::integer => "a whole number",
        Rule::ident => "a name",
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::fdiv | Rule::rem => "an operator",
        Rule::eq | Rule::ne | Rule::lt | Rule::le | Rule::gt | Rule::ge => "an operator",
        Rule::and | Rule::or | Rule::kw_and | Rule::kw_or => "an operator",
        Rule::neg | Rule::not | Rule::kw_not => "a value",
        Rule::kw_rest | Rule::kw_true | Rule::kw_false => "a value",
        Rule::call => "a value",
        // A call starts like a name, which the error already offers.
        Rule::function => return None,
        // Silent or structural rules an error never names.
        Rule::WHITESPACE
        | Rule::COMMENT
        | Rule::schedule
        | Rule::item
        | Rule::stage_clause
        | Rule::setting
        | Rule::diffusion_rule
        | Rule::prefix
        | Rule::infix
        | Rule::primary
        | Rule::ident_char
        | Rule::keyword => return None,
    };
    Some(text.to_string())
}
