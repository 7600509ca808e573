//! The one implementation of the protocol's input rules.
//!
//! The server applies it to every POST; the Leptos client applies it before
//! sending so a person sees the same sentence without a round trip. Lengths
//! are counted in Unicode scalar values (`chars()`), never bytes, and
//! nothing here slices a string by byte index.

use crate::protocol::{PostMessage, DEFAULT_ROOM, MAX_AUTHOR_CHARS, MAX_ROOM_CHARS, MAX_TEXT_CHARS};

/// Why an input was refused: the field and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self { field, message: message.into() }
    }
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ValidationError {}

/// A POST body that passed every rule, normalised (trimmed, lowercase id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPost {
    pub room: String,
    pub author: String,
    pub text: String,
    /// The client's idempotency key, normalised to lowercase hyphenated form.
    pub client_id: Option<String>,
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`
pub fn validate_room(room: &str) -> Result<(), ValidationError> {
    let mut chars = room.chars();
    let Some(first) = chars.next() else {
        return Err(ValidationError::new("room", "Room name must not be empty."));
    };
    let ok_first = first.is_ascii_lowercase() || first.is_ascii_digit();
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok_first || !ok_rest {
        return Err(ValidationError::new(
            "room",
            "Room name may use only lowercase letters, digits, '-' and '_', and must start with a letter or digit.",
        ));
    }
    // All ASCII here, so bytes == chars.
    if room.len() > MAX_ROOM_CHARS {
        return Err(ValidationError::new(
            "room",
            format!("Room name must be at most {MAX_ROOM_CHARS} characters."),
        ));
    }
    Ok(())
}

/// Trims and checks an author name; returns the trimmed name.
pub fn validate_author(author: &str) -> Result<String, ValidationError> {
    let author = author.trim();
    if author.is_empty() {
        return Err(ValidationError::new("author", "Please enter your name."));
    }
    if author.chars().any(char::is_control) {
        return Err(ValidationError::new("author", "Name must not contain control characters."));
    }
    let n = author.chars().count();
    if n > MAX_AUTHOR_CHARS {
        return Err(ValidationError::new(
            "author",
            format!("Name must be at most {MAX_AUTHOR_CHARS} characters (it has {n})."),
        ));
    }
    Ok(author.to_owned())
}

/// Trims and checks a message text; returns the trimmed text.
pub fn validate_text(text: &str) -> Result<String, ValidationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ValidationError::new("text", "Message must not be empty."));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ValidationError::new(
            "text",
            "Message must not contain control characters other than newline and tab.",
        ));
    }
    let n = text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(ValidationError::new(
            "text",
            format!("Message must be at most {MAX_TEXT_CHARS} characters (it has {n})."),
        ));
    }
    Ok(text.to_owned())
}

/// Accepts any UUID spelling and returns the canonical lowercase form.
pub fn validate_client_id(id: &str) -> Result<String, ValidationError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ValidationError::new("client_id", "client_id must be a UUID."))
}

/// Applies every rule to a POST body, in field order.
pub fn validate_post(post: &PostMessage) -> Result<ValidPost, ValidationError> {
    let room = match post.room.as_deref() {
        None => DEFAULT_ROOM.to_owned(),
        Some(r) => {
            validate_room(r)?;
            r.to_owned()
        }
    };
    let author = validate_author(&post.author)?;
    let text = validate_text(&post.text)?;
    let client_id = post.client_id.as_deref().map(validate_client_id).transpose()?;
    Ok(ValidPost { room, author, text, client_id })
}

/// Characters left before the text limit (negative when over), for a
/// composer's counter. Counts the trimmed text, as the server does.
pub fn text_chars_left(text: &str) -> i64 {
    MAX_TEXT_CHARS as i64 - text.trim().chars().count() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(room: Option<&str>, author: &str, text: &str) -> PostMessage {
        PostMessage {
            room: room.map(str::to_owned),
            author: author.into(),
            text: text.into(),
            client_id: None,
        }
    }

    #[test]
    fn room_rules() {
        for ok in ["lobby", "a", "0", "a-b_c", "9lives", &"a".repeat(64)] {
            assert!(validate_room(ok).is_ok(), "{ok:?} should be valid");
        }
        for bad in ["", "-a", "_a", "Lobby", "a b", "a.b", "ä", "a/b", &"a".repeat(65), "lobby\n"] {
            let e = validate_room(bad).unwrap_err();
            assert_eq!(e.field, "room", "{bad:?}");
        }
    }

    #[test]
    fn missing_room_defaults_to_lobby() {
        let v = validate_post(&post(None, "ana", "hi")).unwrap();
        assert_eq!(v.room, "lobby");
    }

    #[test]
    fn author_is_trimmed_and_bounded_in_characters() {
        assert_eq!(validate_author("  ana \t").unwrap(), "ana");
        assert_eq!(validate_author("   ").unwrap_err().field, "author");
        assert_eq!(validate_author("").unwrap_err().field, "author");
        // 40 four-byte characters: valid; 41: not.
        let forty = "😀".repeat(40);
        assert_eq!(validate_author(&forty).unwrap(), forty);
        assert!(validate_author(&"😀".repeat(41)).is_err());
        // Surrounding whitespace does not count.
        assert!(validate_author(&format!("  {}  ", "x".repeat(40))).is_ok());
    }

    #[test]
    fn author_refuses_control_characters_including_newline() {
        for bad in ["a\nb", "a\u{0}b", "a\u{7f}", "a\u{85}b", "a\tb", "a\u{1b}[31m"] {
            assert!(validate_author(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_limit_is_counted_in_characters_not_bytes() {
        let at_limit = "😀".repeat(MAX_TEXT_CHARS);
        assert_eq!(at_limit.len(), 4 * MAX_TEXT_CHARS);
        assert_eq!(validate_text(&at_limit).unwrap(), at_limit);
        let over = "😀".repeat(MAX_TEXT_CHARS + 1);
        let e = validate_text(&over).unwrap_err();
        assert_eq!(e.field, "text");
        assert!(e.message.contains("4001"), "{}", e.message);
        assert!(validate_text(&"a".repeat(MAX_TEXT_CHARS)).is_ok());
        assert!(validate_text(&"a".repeat(MAX_TEXT_CHARS + 1)).is_err());
    }

    #[test]
    fn text_keeps_inner_newlines_and_tabs_and_odd_unicode() {
        let t = "line one\n\tline two";
        assert_eq!(validate_text(t).unwrap(), t);
        // combining marks, right-to-left marks, zero-width joiners: not control
        for t in ["e\u{301}", "\u{202e}abc", "\u{200f}שלום", "👩\u{200d}💻", "<script>alert(1)</script>"] {
            assert_eq!(validate_text(t).unwrap(), t);
        }
        assert_eq!(validate_text("  hi \n ").unwrap(), "hi");
    }

    #[test]
    fn text_refuses_empty_and_other_control_characters() {
        assert!(validate_text("").is_err());
        assert!(validate_text(" \n\t ").is_err());
        for bad in ["a\rb", "a\u{0}b", "a\u{7}b", "a\u{1b}b", "a\u{9f}b", "a\u{7f}b"] {
            assert_eq!(validate_text(bad).unwrap_err().field, "text", "{bad:?}");
        }
    }

    #[test]
    fn client_id_must_be_a_uuid_and_is_normalised() {
        let id = validate_client_id("0193A6F2-7C41-7D3E-9A51-3B0F5C2D9E10").unwrap();
        assert_eq!(id, "0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e10");
        assert_eq!(validate_client_id("nope").unwrap_err().field, "client_id");
        assert!(validate_client_id("").is_err());
    }

    #[test]
    fn validate_post_reports_the_first_bad_field() {
        assert_eq!(validate_post(&post(Some("BAD"), "", "")).unwrap_err().field, "room");
        assert_eq!(validate_post(&post(None, "", "")).unwrap_err().field, "author");
        assert_eq!(validate_post(&post(None, "a", "")).unwrap_err().field, "text");
        let mut p = post(None, "a", "b");
        p.client_id = Some("x".into());
        assert_eq!(validate_post(&p).unwrap_err().field, "client_id");
    }

    #[test]
    fn counter_counts_trimmed_characters() {
        assert_eq!(text_chars_left(""), 4000);
        assert_eq!(text_chars_left(" 😀 "), 3999);
        assert_eq!(text_chars_left(&"x".repeat(4001)), -1);
    }
}
