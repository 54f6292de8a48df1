terraform {
  required_version = ">= 1.6"

  required_providers {
    hyperv = {
      source  = "taliesins/hyperv"
      version = ">= 1.2.1, < 2.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = ">= 2.4, < 3.0"
    }
  }
}
