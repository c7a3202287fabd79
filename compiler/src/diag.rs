//! Diagnostics as data, and the one renderer that turns them into text.
//!
//! Library code never prints: passes return `Vec<Diagnostic>`, and the CLI or a
//! test renders them with [`render`] (colour-free for snapshots).

use crate::source::{SourceMap, Span};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource};
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// A problem found in user input: a message, labelled spans and a hint.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// Stable short code, e.g. `E0101`, documented in docs/language.md.
    pub code: &'static str,
    pub message: String,
    /// The first label is the primary location.
    pub labels: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic { code, message: message.into(), labels: Vec::new(), help: None }
    }

    pub fn at(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        let message = message.into();
        Diagnostic::new(code, message.clone()).label(span, "")
    }

    pub fn label(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label { span, message: message.into() });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn primary(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }
}

/// Renders diagnostics as rustc-like text: `error[code]: message`, then
/// `file:line:col`, a snippet with carets and labels, and the hint.
pub fn render(sources: &SourceMap, diags: &[Diagnostic], color: bool) -> String {
    let theme = if color { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_links(false);
    let mut out = String::new();
    for d in diags {
        let report = Report::new(sources, d);
        for r in std::iter::once(&report).chain(&report.elsewhere) {
            let mut text = String::new();
            handler.render_report(&mut text, r).expect("writing to a String cannot fail");
            // The snippet's long lines were cut; the header names the column
            // in the file, not in the cut line.
            if let Some((shown, real)) = &r.column_fix {
                text = text.replacen(shown.as_str(), real, 1);
            }
            out.push_str(&text);
        }
    }
    out
}

/// `text` with each word longer than 80 characters (a name thousands of
/// characters long, quoted in a message) cut to its ends around a `…`.
fn clip_words(text: &str) -> String {
    if !text.split_whitespace().any(|w| w.chars().count() > 80) {
        return text.to_string();
    }
    let clip = |w: &str| {
        let chars: Vec<char> = w.chars().collect();
        if chars.len() <= 80 {
            return w.to_string();
        }
        let (head, tail): (String, String) = (chars[..40].iter().collect(), chars[chars.len() - 20..].iter().collect());
        format!("{head}…{tail}")
    };
    text.split(' ').map(clip).collect::<Vec<_>>().join(" ")
}

/// Lines longer than this are shown as a window around their labels (miette
/// pads with format widths, which panic past 65,535 columns, and nobody reads
/// a snippet thousands of columns wide).
const MAX_LINE: usize = 160;

/// `text` with every line longer than [`MAX_LINE`] cut to a window (marked
/// with `…`) around the first of `offsets` on it, and a map from offsets in
/// `text` to offsets in the cut text.
fn windowed(text: &str, offsets: &[usize]) -> (String, impl Fn(usize) -> usize) {
    let mut out = String::with_capacity(text.len().min(1 << 20));
    // (start in text, end in text, start in out) of each part kept.
    let mut kept: Vec<(usize, usize, usize)> = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let line_end = line_start + body.len();
        let (mut lo, mut hi) = (line_start, line_end);
        if body.len() > MAX_LINE {
            let focus =
                offsets.iter().copied().filter(|o| (line_start..=line_end).contains(o)).min().unwrap_or(line_start);
            lo = focus.saturating_sub(MAX_LINE / 3).max(line_start);
            while !text.is_char_boundary(lo) {
                lo -= 1;
            }
            hi = (lo + MAX_LINE).min(line_end);
            while !text.is_char_boundary(hi) {
                hi -= 1;
            }
        }
        if lo > line_start {
            out.push('…');
        }
        if hi < line_end {
            kept.push((lo, hi, out.len()));
            out.push_str(&text[lo..hi]);
            out.push('…');
            out.push_str(&line[body.len()..]);
        } else {
            // Offsets on the line break (and the end of the file) stay where they are.
            kept.push((lo, line_start + line.len(), out.len()));
            out.push_str(&text[lo..line_start + line.len()]);
        }
        line_start += line.len();
    }
    let map = move |offset: usize| {
        let i = kept.partition_point(|&(start, _, _)| start <= offset).saturating_sub(1);
        kept.get(i).map_or(0, |&(start, end, at)| at + offset.clamp(start, end) - start)
    };
    (out, map)
}

/// 1-based line and column of `offset` in `text`, counted as miette counts
/// them (the column in bytes).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (before.iter().filter(|&&b| b == b'\n').count() + 1, before.len() - line_start + 1)
}

/// A report's source with its long lines cut around the labels.
struct Cut {
    source: NamedSource<String>,
    /// Each label's (offset, length) in the cut text.
    spans: Vec<(usize, usize)>,
    /// `[name:line:column]` as miette computes it in the cut text, and the
    /// same in the file, when they differ.
    header: Option<(String, String)>,
}

fn cut_source(name: &str, text: &str, spans: &[Span]) -> Cut {
    let offsets: Vec<usize> = spans.iter().flat_map(|s| [s.start as usize, s.end as usize]).collect();
    let (cut, map) = windowed(text, &offsets);
    let spans: Vec<(usize, usize)> = spans
        .iter()
        .map(|s| {
            let start = map(s.start as usize);
            (start, map(s.end as usize).saturating_sub(start))
        })
        .collect();
    let header = spans.first().and_then(|&(start, _)| {
        let real = line_column(text, offsets[0]);
        let shown = line_column(&cut, start);
        (real != shown)
            .then(|| (format!("[{name}:{}:{}]", shown.0, shown.1), format!("[{name}:{}:{}]", real.0, real.1)))
    });
    Cut { source: NamedSource::new(name, cut), spans, header }
}

/// Adapter from [`Diagnostic`] to miette. Labels in files other than the
/// primary one become separate "note" reports, since miette shows one source.
struct Report {
    code: &'static str,
    message: String,
    help: Option<String>,
    source: Option<NamedSource<String>>,
    labels: Vec<LabeledSpan>,
    elsewhere: Vec<Report>,
    column_fix: Option<(String, String)>,
}

impl Report {
    fn new(sources: &SourceMap, d: &Diagnostic) -> Report {
        let mut report = Report {
            code: d.code,
            message: clip_words(&d.message),
            help: d.help.as_deref().map(clip_words),
            source: None,
            labels: Vec::new(),
            elsewhere: Vec::new(),
            column_fix: None,
        };
        let Some(primary) = d.primary() else {
            return report;
        };
        let file = sources.file(primary.file);
        let here: Vec<&Label> = d.labels.iter().filter(|l| l.span.file == primary.file).collect();
        let spans: Vec<Span> = here.iter().map(|l| l.span).collect();
        let cut = cut_source(&file.name, &file.text, &spans);
        report.source = Some(cut.source);
        report.column_fix = cut.header;
        for (i, (l, span)) in here.iter().zip(cut.spans).enumerate() {
            let text = (!l.message.is_empty()).then(|| clip_words(&l.message));
            report.labels.push(if i == 0 {
                LabeledSpan::new_primary_with_span(text, span)
            } else {
                LabeledSpan::new_with_span(text, span)
            });
        }
        for l in d.labels.iter().filter(|l| l.span.file != primary.file) {
            let other = sources.file(l.span.file);
            let cut = cut_source(&other.name, &other.text, &[l.span]);
            report.elsewhere.push(Report {
                code: "note",
                message: clip_words(&l.message),
                help: None,
                source: Some(cut.source),
                labels: vec![LabeledSpan::new_primary_with_span(None, cut.spans[0])],
                elsewhere: Vec::new(),
                column_fix: cut.header,
            });
        }
        report
    }
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() { None } else { Some(Box::new(self.labels.iter().cloned())) }
    }
}

/// "did you mean X?" for the closest candidate within a small edit distance.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (name.len().max(c.len()) / 3).max(1))
        .min()
        .map(|(_, c)| format!("did you mean `{c}`?"))
}
