//! TwiML documents, written with an XML writer (`quick-xml`), never by string
//! formatting: an unescaped `&` in TwiML is Twilio error 12100 and the caller hears
//! "an application error has occurred".
//!
//! Attribute values are escaped for `&`, `<`, `>`, `"` and `'`, and tab, newline and
//! carriage return are written as character references: XML parsers normalize raw
//! whitespace in attributes to spaces, which would change a pretext and break the
//! context signature. Characters XML 1.0 cannot carry at all (most C0 controls,
//! U+FFFE, U+FFFF) are refused: callers validate or [`xml_safe`] their input first.

use std::borrow::Cow;

use quick_xml::Writer;
use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event};
use quick_xml::name::QName;

/// Twilio's cap on inline TwiML passed to the Calls API (error 32018).
pub const INLINE_TWIML_MAX_CHARS: usize = 4000;

/// A value TwiML cannot carry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} contains a character XML cannot carry (U+{code:04X})")]
pub struct TwimlError {
    /// Which value.
    pub field: String,
    /// The offending code point.
    pub code: u32,
}

/// True for characters allowed in XML 1.0 documents.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// `s` without characters XML 1.0 cannot carry.
pub fn xml_safe(s: &str) -> Cow<'_, str> {
    if s.chars().all(is_xml_char) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.chars().filter(|c| is_xml_char(*c)).collect())
    }
}

fn check(field: &str, value: &str) -> Result<(), TwimlError> {
    match value.chars().find(|c| !is_xml_char(*c)) {
        None => Ok(()),
        Some(c) => Err(TwimlError {
            field: field.to_string(),
            code: c as u32,
        }),
    }
}

/// Escapes an attribute value (see the module docs).
fn escape_attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

fn attr<'a>(key: &'a str, value: &str) -> Attribute<'a> {
    Attribute {
        key: QName(key.as_bytes()),
        value: Cow::Owned(escape_attr(value).into_bytes()),
    }
}

struct Doc {
    w: Writer<Vec<u8>>,
}

impl Doc {
    fn new() -> Self {
        let mut w = Writer::new(Vec::new());
        // Writing into a Vec cannot fail.
        let _ = w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
        let _ = w.write_event(Event::Start(BytesStart::new("Response")));
        Self { w }
    }
    fn start(&mut self, el: BytesStart<'_>) {
        let _ = self.w.write_event(Event::Start(el));
    }
    fn empty(&mut self, el: BytesStart<'_>) {
        let _ = self.w.write_event(Event::Empty(el));
    }
    fn end(&mut self, name: &str) {
        let _ = self.w.write_event(Event::End(BytesEnd::new(name)));
    }
    fn finish(mut self) -> String {
        self.end("Response");
        // Only `&str` went in, so the bytes are UTF-8.
        String::from_utf8_lossy(&self.w.into_inner()).into_owned()
    }
}

/// `<Response><Connect><Stream url=...><Parameter name value/>...</Stream></Connect></Response>`.
///
/// `stream_url` must carry no query string (Twilio drops it); everything the stream
/// needs travels in `params`, which come back in `start.customParameters`.
pub fn connect_stream(stream_url: &str, params: &[(String, String)]) -> Result<String, TwimlError> {
    check("stream url", stream_url)?;
    for (k, v) in params {
        check(k, k)?;
        check(k, v)?;
    }
    let mut d = Doc::new();
    d.start(BytesStart::new("Connect"));
    let mut stream = BytesStart::new("Stream");
    stream.push_attribute(attr("url", stream_url));
    d.start(stream);
    for (k, v) in params {
        let mut p = BytesStart::new("Parameter");
        p.push_attribute(attr("name", k));
        p.push_attribute(attr("value", v));
        d.empty(p);
    }
    d.end("Stream");
    d.end("Connect");
    Ok(d.finish())
}

/// `<Response><Reject/></Response>`: no persona answers this number. Twilio plays a
/// busy signal and does not bill the call as answered.
pub fn reject() -> String {
    let mut d = Doc::new();
    d.empty(BytesStart::new("Reject"));
    d.finish()
}

/// `<Response/>`-equivalent for callbacks whose body Twilio ignores.
pub fn empty() -> String {
    Doc::new().finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::Reader;

    /// Parses `<Parameter>`s and the stream url back with a real XML parser.
    fn parse(xml: &str) -> (Option<String>, Vec<(String, String)>, Vec<String>) {
        let mut r = Reader::from_str(xml);
        let mut url = None;
        let mut params = Vec::new();
        let mut elements = Vec::new();
        loop {
            match r.read_event().expect("well-formed XML") {
                Event::Start(e) | Event::Empty(e) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    let get = |k: &str| {
                        e.attributes()
                            .map(|a| a.unwrap())
                            .find(|a| a.key.as_ref() == k.as_bytes())
                            .map(|a| a.unescape_value().unwrap().into_owned())
                    };
                    if name == "Stream" {
                        url = get("url");
                    }
                    if name == "Parameter" {
                        params.push((get("name").unwrap(), get("value").unwrap()));
                    }
                    elements.push(name);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        (url, params, elements)
    }

    #[test]
    fn hostile_values_round_trip_exactly() {
        // Proves &, <, quotes, emoji, newlines and long values survive an XML parser unchanged.
        let long: String = "Ünïcødé & <b>\"quoted\"</b> 'single' 🙂 "
            .chars()
            .cycle()
            .take(500)
            .collect();
        let params = vec![
            ("pretext".to_string(), long.clone()),
            ("amp".to_string(), "a&b&amp;c".to_string()),
            ("lines".to_string(), "one\ntwo\r\nthree\tfour".to_string()),
            ("empty".to_string(), String::new()),
        ];
        let xml = connect_stream("wss://pod.example.com/twilio/stream", &params).unwrap();
        assert!(
            xml.starts_with("<?xml"),
            "no leading whitespace before the declaration"
        );
        let (url, back, elements) = parse(&xml);
        assert_eq!(url.as_deref(), Some("wss://pod.example.com/twilio/stream"));
        assert_eq!(back, params);
        assert_eq!(elements[..3], ["Response", "Connect", "Stream"]);
        assert_eq!(long.chars().count(), 500);
    }

    #[test]
    fn control_characters_are_refused() {
        // Proves a value XML cannot carry is an error, not broken TwiML.
        let err =
            connect_stream("wss://x/twilio/stream", &[("p".into(), "a\u{1}b".into())]).unwrap_err();
        assert_eq!(err.code, 1);
        assert_eq!(xml_safe("a\u{1}b\u{FFFE}"), "ab");
    }

    #[test]
    fn reject_is_well_formed() {
        // Proves the refusal document parses and holds exactly the Reject verb.
        assert_eq!(parse(&reject()).2, ["Response", "Reject"]);
    }
}
