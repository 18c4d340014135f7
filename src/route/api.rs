//! Which API endpoint a path names. Hot: called once per request.

/// The API calls llm-edge routes by the body's `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiEndpoint {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/completions`
    Completions,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/responses`
    Responses,
    /// `/v1/messages` (Anthropic)
    Messages,
    /// `/v1/messages/count_tokens` (Anthropic)
    CountTokens,
}

impl ApiEndpoint {
    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
        }
    }
}

/// What a request path is, before pass-through routes are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiPath {
    /// An API call routed by model.
    Call(ApiEndpoint),
    /// `/v1/models`, answered from config.
    ListModels,
    /// Anything else.
    Other,
}

/// Classifies a path (without query string).
pub fn classify(path: &str) -> ApiPath {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return ApiPath::Other;
    };
    match rest {
        "chat/completions" => ApiPath::Call(ApiEndpoint::ChatCompletions),
        "completions" => ApiPath::Call(ApiEndpoint::Completions),
        "embeddings" => ApiPath::Call(ApiEndpoint::Embeddings),
        "responses" => ApiPath::Call(ApiEndpoint::Responses),
        "messages" => ApiPath::Call(ApiEndpoint::Messages),
        "messages/count_tokens" => ApiPath::Call(ApiEndpoint::CountTokens),
        "models" => ApiPath::ListModels,
        _ => ApiPath::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths() {
        assert_eq!(
            classify("/v1/chat/completions"),
            ApiPath::Call(ApiEndpoint::ChatCompletions)
        );
        assert_eq!(
            classify("/v1/messages/count_tokens"),
            ApiPath::Call(ApiEndpoint::CountTokens)
        );
        assert_eq!(classify("/v1/models"), ApiPath::ListModels);
        assert_eq!(classify("/v1/chat/completions/x"), ApiPath::Other);
        assert_eq!(classify("/v2/chat/completions"), ApiPath::Other);
        assert_eq!(classify("/"), ApiPath::Other);
    }
}
