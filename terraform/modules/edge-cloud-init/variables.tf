variable "hostname" {
  description = "Host name of the edge VM."
  type        = string
}

variable "tenant" {
  description = "Tenant id on the agent's certificate (dcs://TENANT/AGENT). Used for labels and checks only: the identity comes from the certificate."
  type        = string
}

variable "agent_id" {
  description = "Agent id on the agent's certificate (dcs://TENANT/AGENT)."
  type        = string
}

variable "aggregator_url" {
  description = "https:// URL of the aggregator (its load balancer), e.g. https://ingest.example.com:8443. The host name must be on the aggregator's server certificate."
  type        = string

  validation {
    condition     = startswith(var.aggregator_url, "https://")
    error_message = "aggregator_url must be an https:// URL: agents only speak mutual TLS."
  }
}

variable "proxy_url" {
  description = "Outbound HTTP proxy (HTTP CONNECT) for the package download and the agent, e.g. http://proxy.site.example:3128. Null: direct."
  type        = string
  default     = null
}

variable "listen_address" {
  description = "Where the agent accepts records from producers (and serves /metrics). Keep it on loopback unless producers or Prometheus run elsewhere; then firewall the port."
  type        = string
  default     = "127.0.0.1:8780"
}

variable "buffer_capacity" {
  description = "buffer.capacity of the agent, e.g. \"8GiB\". Size the VM's disk for it (docs/DEPLOYMENT.md)."
  type        = string
  default     = "1GiB"
}

variable "deb_url" {
  description = "Where the VM downloads the dcs-edge .deb (a release asset or an internal mirror)."
  type        = string
}

variable "deb_sha256" {
  description = "SHA-256 of the .deb; the install stops if the download does not match."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.deb_sha256))
    error_message = "deb_sha256 must be 64 lower-case hex digits."
  }
}

variable "ca_pem" {
  description = "The DCS CA certificate (ca.pem from `dcs-certs agent`)."
  type        = string
}

variable "agent_cert_pem" {
  description = "The agent's certificate (agent.pem from `dcs-certs agent`)."
  type        = string
}

variable "agent_key_pem" {
  description = "The agent's private key (agent-key.pem). It travels in the VM's cloud-init data: see docs/DEPLOYMENT.md for who can read that."
  type        = string
  sensitive   = true
}

variable "ssh_authorized_keys" {
  description = "SSH public keys for the image's default user. Empty: no SSH key is added."
  type        = list(string)
  default     = []
}

variable "ntp_servers" {
  description = "NTP servers (certificate validation and record timestamps need a correct clock). Empty: the image's default."
  type        = list(string)
  default     = []
}
