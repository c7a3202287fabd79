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
        handler.render_report(&mut out, &report).expect("writing to a String cannot fail");
        for related in &report.elsewhere {
            handler.render_report(&mut out, related).expect("writing to a String cannot fail");
        }
    }
    out
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
}

impl Report {
    fn new(sources: &SourceMap, d: &Diagnostic) -> Report {
        let mut report = Report {
            code: d.code,
            message: d.message.clone(),
            help: d.help.clone(),
            source: None,
            labels: Vec::new(),
            elsewhere: Vec::new(),
        };
        let Some(primary) = d.primary() else {
            return report;
        };
        let file = sources.file(primary.file);
        report.source = Some(NamedSource::new(file.name.clone(), file.text.clone()));
        for (i, l) in d.labels.iter().enumerate() {
            let text = (!l.message.is_empty()).then(|| l.message.clone());
            let span = (l.span.start as usize, (l.span.end - l.span.start) as usize);
            if l.span.file == primary.file {
                report.labels.push(if i == 0 {
                    LabeledSpan::new_primary_with_span(text, span)
                } else {
                    LabeledSpan::new_with_span(text, span)
                });
            } else {
                let other = sources.file(l.span.file);
                report.elsewhere.push(Report {
                    code: "note",
                    message: l.message.clone(),
                    help: None,
                    source: Some(NamedSource::new(other.name.clone(), other.text.clone())),
                    labels: vec![LabeledSpan::new_primary_with_span(None, span)],
                    elsewhere: Vec::new(),
                });
            }
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
